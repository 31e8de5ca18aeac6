"""The peers, written from their papers: SparseGPT and Wanda (sparsegpt_wanda.py), SliceGPT
(slicegpt.py), and a check of slicegpt.py against its authors' code (slicegpt_authors.py)."""
