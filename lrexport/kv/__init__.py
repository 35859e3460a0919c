"""Palu KV-cache compression: latent K/V projections, their allocation and quantization."""
