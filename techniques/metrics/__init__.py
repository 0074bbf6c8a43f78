"""The techniques' evaluation metrics (docs/techniques.md: each technique's "Evaluation metrics"), as pure
functions on tensors.

One module per metric family; each function's docstring names the metric it computes.
Nothing here touches a model, a process group or a file, except the vocab-parallel reductions in
`entropy`, which take an optional process group. `launch/evaluate.py` runs the model and feeds
these functions; `tests/eval/` checks every metric on a constructed case with a known answer.

    perplexity      held-out perplexity, PPL-F and its CV, sliding-window plans, context gains
    entropy         predictive entropy (incl. the vocab-parallel M/S/U reduction), EV, H̄ statistics
    lexical         lexical instability, rep-n, distinct-n, sentence-length std
    representation  latent drift, representation variability, effective rank, anisotropy,
                    coherence score/margin, rare-token self-consistency
    attention       Jensen–Shannon divergence, cross-layer AHD, within-layer head dispersion
    recall          frequency buckets, long-gap positions, key–value and numerical probes and scores
    geometry        silhouette (cosine), kNN@10 overlap, low-density fraction, retrieval@k by bucket
    robustness      nearest-embedding substitution, ΔNLL, top-1 agreement, L2 FGSM
    optimization    grad-norm CV and spike count (optimisation smoothness), overhead ratios
"""
