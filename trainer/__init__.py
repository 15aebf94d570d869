"""resnet-cifar trainer: the model, the Config, distribution and the training loop."""
