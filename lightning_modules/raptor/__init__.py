"""Raptor: distil a ViT teacher into k block-recurrent blocks, one per phase of its depth."""
