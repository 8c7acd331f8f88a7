"""genlab inference: the data module, the one SVI runner, the training command line."""
