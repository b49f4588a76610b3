"""Long-tailed data sets, minimalist data augmentation and test-time crops."""
