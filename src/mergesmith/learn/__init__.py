"""Learned merge coefficients: autograd on a functional merged model, written out as an ordinary recipe.

``adamerging`` learns task-wise or layer-wise task-vector coefficients (AdaMerging, Yang et al.,
ICLR 2024); ``mergesmith merge`` then executes the recipe it writes like any other, streamed.
See docs/learn.md.
"""
