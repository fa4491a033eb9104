"""The training engine: composition of strategies, forward pass, optimisation,
evaluation and checkpoints. Imports torch; nothing here loads at CLI start-up."""
