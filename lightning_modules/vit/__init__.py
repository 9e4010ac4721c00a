"""A plain timm ViT classifier: the `vit` task and the default Raptor teacher."""
