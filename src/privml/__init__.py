"""privml: federated, differentially private, homomorphically served machine learning."""

__version__ = "0.1.0"
