"""Networks PuLID needs, in plain torch: EVA02-CLIP vision tower, BiSeNet face parsing, ID encoders."""
