"""Vision backbones: the torchvision zoo, weight loading and the project's own base model."""
