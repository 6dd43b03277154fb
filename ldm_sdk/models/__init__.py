"""Networks with CompVis parameter names: first stages (KL, VQ), the UNet, attention, embeddings."""
