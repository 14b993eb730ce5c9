"""Neural FOXP2: find and steer the language neurons of a causal LM (uses sae_train)."""
