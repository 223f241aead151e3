"""shortcut_study: shortcut learning in CNNs on CIFAR-10 + MNIST composites."""
