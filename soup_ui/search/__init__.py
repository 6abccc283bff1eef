"""Finding the soup: from the look a person wants to the mix. The search space (shard weights on the
simplex, optionally per-shard block-group weights and the method's numeric parameters), the scorers
(the shipped style judges against a target share of styles, similarity to reference images in an
image encoder's space, or the user's own function), the scorer search (CMA-ES, or random search of the
same budget) and the preference search (BoTorch's pairwise GP, proposing rounds from a person's picks).
Imports the engine, the model files, the training room's judges and below; the page and the CLI
import it, never the other way.
"""
