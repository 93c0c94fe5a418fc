"""Learned merge coefficients: autograd on a functional merged model, written out as an ordinary recipe.

``adamerging`` learns task-wise or layer-wise task-vector coefficients (AdaMerging, Yang et al.,
ICLR 2024; docs/learn.md); ``dam`` learns per-column coefficients of full weights (DAM,
Gauthier-Caron et al. 2024; docs/dam.md). ``mergesmith merge`` then executes the recipe each
writes like any other, streamed.
"""
