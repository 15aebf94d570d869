"""CIFAR-10 input pipeline: sources that load uint8 images, pure tf.data transforms on top."""
