"""Per-video codebooks: cosine k-means in FAISS with k-means++ seeding, fixed or adaptive ``K``.

What is the paper's, the released code's, and ours:

* **Cosine k-means with k-means++ initialisation** (paper and code). Tokens are L2-normalised and clustered
  with FAISS's spherical k-means (inner-product assignment, centroids re-normalised every iteration), which
  is Lloyd's algorithm for the cosine distance ``1 - x.c``. FAISS seeds at random (and only FAISS >= 1.12
  offers k-means++), so the k-means++ seeding is done here, in torch, from the item's own seeded generator:
  the same video always gets the same codebook, alone or in a batch, whatever the FAISS version.
* **Stopping** (code: up to 100 iterations, tolerance 1e-4 on the centroid shift). FAISS stops when the
  objective stops changing; where it has ``early_stop_threshold`` (FAISS >= 1.11) we pass ``tol`` as the
  relative objective improvement below which it stops. That is ours; the tolerance is not the same quantity.
* **Adaptive K, elbow** (code): k-means for every ``K`` in ``[k_min, k_max]``, distortion
  ``sum ||x - c_label||^2`` over unit vectors, and the ``K`` where the second difference of the distortion
  is largest. The released code forgets that its candidate list starts at 12 and adds a constant
  (``K = max(argmax + 4, 12)``), so in practice it returns K in [12, 22] whatever the video. Here the
  argmax is mapped back onto the candidate list: the second difference at index ``j`` is centred on
  candidate ``j + 1``, which is the elbow.
* **Adaptive K, silhouette** (ours). The code's "silhouette" is the mean inner product of every token with
  its 50 nearest neighbours, the same for every K. Here it is the real mean silhouette
  ``s(i) = (b_i - a_i) / max(a_i, b_i)`` under the cosine distance. The mean cosine distance from a unit
  vector to a set of unit vectors is ``1 - x.mean(set)``, so it costs ``O(N K D)`` with no ``N x N``
  matrix. Singletons score 0, the usual convention.
* The paper names "adaptive K-Means (Bhatia 2004)". We did not implement that; the two selectors above are
  what we have.

Where the k-means runs (``kmeans``): FAISS (imported lazily, ``pip install 'tokenreduce[vq]'``) on the
GPU with faiss-gpu, else faiss-cpu on host copies; or Lloyd's iterations in torch on the features' own
device (:func:`lloyd_kmeans`: one fused assignment and one scatter-add per iteration). ``"auto"`` takes
FAISS for CPU tensors and for CUDA tensors when faiss-gpu is installed, torch for CUDA tensors otherwise:
on an H200 the faiss-cpu k-means on host copies of a 0.5B model's video tokens cost more (42-560 ms at
2-32 frames) than the prefill the codes saved. Both start from the same k-means++ seeds. Assigning tokens
to codewords, for the index map and for the distortion, goes through
:func:`tokenreduce.kernels.codebook_assign`, the project's fused nearest-codeword kernel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce import kernels
from tokenreduce.core.hostsync import host_only

ADAPTIVE = ("elbow", "silhouette")
KMEANS = ("auto", "faiss", "torch")


def import_faiss() -> Any:
    """The ``faiss`` module, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - the test environment has faiss-cpu
        raise ImportError(
            "vqtoken clusters visual tokens with FAISS, which is not installed; install the `vq` extra: "
            "pip install 'tokenreduce[vq]' (faiss-cpu), or faiss-gpu for clustering on the GPU"
        ) from error
    return faiss


def faiss_gpus(faiss: Any) -> int:
    """Number of GPUs FAISS can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # pragma: no cover - a broken CUDA setup: cluster on the CPU
        return 0


@contextlib.contextmanager
def faiss_threads(faiss: Any, threads: int) -> Iterator[None]:
    """Run FAISS with ``threads`` OpenMP threads inside the block (0: leave FAISS's setting alone).

    Per-video problems are small (hundreds to tens of thousands of points); one thread is fastest there,
    and OpenMP threads spin-waiting on busy cores can make a 2 ms clustering take a second.
    """
    if threads <= 0:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` as float32 unit vectors (zero rows stay zero)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def kmeans_pp_seeds(
    x: torch.Tensor, k: int, generator: torch.Generator, trials: int | None = None
) -> torch.Tensor:
    """k-means++ seeds for the cosine distance: indices ``[k]`` of rows of the unit vectors ``x``.

    The first seed is uniform; each next one is drawn with probability proportional to the squared
    distance to the nearest seed so far, ``||x - c||^2 = 2 (1 - x.c)`` for unit vectors. Greedy k-means++
    (Arthur & Vassilvitskii's variant, scikit-learn's default): ``trials`` candidates are drawn per step
    (default ``2 + floor(ln k)``) and the one that lowers the total squared distance most is kept. Without
    it, a few small objects in a large noisy background are often left without a seed. When every remaining
    point coincides with a seed (all weights zero) the draw is uniform.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means++ needs 1 <= k <= number of points ({n}), got k={k}")
    trials = 2 + int(math.log(k)) if trials is None else int(trials)
    if trials < 1:
        raise ValueError(f"`trials` must be >= 1, got {trials}")
    with host_only():  # drawn from the host generator: a host tensor
        first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    nearest = x @ x[first]  # best cosine similarity to the seeds so far
    for _ in range(k - 1):
        # drawn on the host from the host generator: the same seeds whichever device holds ``x``. The
        # weights come over once per seed (the draw needs them); their sum is then taken on the host.
        weights = (2.0 - 2.0 * nearest).clamp_min(0.0).double().cpu()
        with host_only():
            if float(weights.sum()) <= 0.0:
                weights = torch.ones_like(weights)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)
        updated = torch.maximum(nearest[None], x[candidates.to(x.device)] @ x.T)  # [trials, N]
        potential = (2.0 - 2.0 * updated.double()).clamp_min(0.0).sum(1)
        best = int(torch.argmin(potential))  # ties: the first candidate drawn
        with host_only():  # the candidates were drawn on the host
            chosen.append(int(candidates[best]))
        nearest = updated[best]
    return torch.tensor(chosen, dtype=torch.long)


def kmeans_backend(x: torch.Tensor, kmeans: str = "auto", use_gpu: bool | None = None) -> str:
    """``"faiss"`` or ``"torch"``: where :func:`spherical_kmeans` clusters ``x`` (see the module doc)."""
    if kmeans not in KMEANS:
        raise ValueError(f"`kmeans` must be one of {KMEANS}, got {kmeans!r}")
    if kmeans == "torch" and use_gpu:
        raise ValueError("`use_gpu`=True asks for faiss-gpu but `kmeans`='torch' clusters in torch; drop one")
    if kmeans != "auto":
        return kmeans
    if not x.is_cuda or use_gpu:
        return "faiss"
    try:
        import faiss
    except ImportError:
        return "torch"
    return "faiss" if faiss_gpus(faiss) > 0 else "torch"


def lloyd_kmeans(x: torch.Tensor, init: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-4) -> torch.Tensor:
    """Spherical k-means of the unit vectors ``x: [N, D]`` from the unit centroids ``init: [K, D]``, in
    torch on ``x``'s device: assign every vector to its most similar centroid, move each centroid to the
    normalised sum of its members; stop when an assignment improves the summed similarity by no more than
    ``tol`` (relative) or after ``max_iter`` such iterations. A centroid that loses all its members stays
    where it was.
    """
    x = x.float()
    centroids = init.float()
    previous = None
    for _ in range(max_iter):
        codes, similarity = kernels.codebook_assign(x, centroids, "cosine")
        objective = float(similarity.double().sum())
        if previous is not None and objective - previous <= tol * abs(previous):
            break
        previous = objective
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=centroids.shape[0])
        centroids = torch.where((counts > 0)[:, None], normalize(sums), centroids)
    return centroids


def spherical_kmeans(
    x: torch.Tensor,
    k: int,
    *,
    generator: torch.Generator,
    max_iter: int = 100,
    tol: float = 1e-4,
    threads: int = 1,
    use_gpu: bool | None = None,
    kmeans: str = "auto",
) -> torch.Tensor:
    """Cosine k-means of the unit vectors ``x: [N, D]`` into ``k`` unit centroids ``[k, D]`` (float32, on
    ``x``'s device), seeded by :func:`kmeans_pp_seeds`.

    ``kmeans``: ``"faiss"``, ``"torch"`` (:func:`lloyd_kmeans`) or ``"auto"`` (:func:`kmeans_backend`).
    ``use_gpu``: cluster with faiss-gpu (``None``: when it is installed and ``x`` is a CUDA tensor).
    """
    backend = kmeans_backend(x, kmeans, use_gpu)
    seeds = kmeans_pp_seeds(x, k, generator)
    if backend == "torch":
        return lloyd_kmeans(x, x[seeds.to(x.device)], max_iter=max_iter, tol=tol)
    faiss = import_faiss()
    import numpy as np

    host = x.detach().float().cpu().contiguous()
    points = np.ascontiguousarray(host.numpy(), dtype=np.float32)
    init = np.ascontiguousarray(points[seeds.numpy()], dtype=np.float32)
    gpus = faiss_gpus(faiss)
    gpu = (x.is_cuda and gpus > 0) if use_gpu is None else bool(use_gpu)
    if gpu and gpus == 0:
        raise ValueError(
            "`use_gpu`=True but FAISS sees no GPU: install faiss-gpu or set use_gpu to None/False"
        )
    options: dict[str, Any] = dict(
        niter=int(max_iter),
        spherical=True,
        verbose=False,
        seed=1234,
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 30,
    )
    if hasattr(faiss.ClusteringParameters(), "early_stop_threshold"):
        options["early_stop_threshold"] = float(tol)
    if gpu:
        options["gpu"] = 1
    with faiss_threads(faiss, threads):
        km = faiss.Kmeans(points.shape[1], k, **options)
        km.train(points, init_centroids=init)
    centroids = torch.from_numpy(np.array(km.centroids, dtype=np.float32).reshape(k, -1))
    return normalize(centroids).to(x.device)


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword (cosine) of every row: ``(codes [N] int64, similarity [N] float32)``."""
    return kernels.codebook_assign(x, centroids.to(x.device, x.dtype), metric="cosine")


def distortion(similarity: torch.Tensor) -> float:
    """``sum ||x - c_label||^2`` over unit vectors and unit centroids, from the cosine similarities."""
    return float((2.0 - 2.0 * similarity.double()).clamp_min(0.0).sum())


def silhouette(x: torch.Tensor, codes: torch.Tensor, k: int) -> float:
    """Exact mean silhouette of the labelling ``codes`` of unit vectors ``x`` under the cosine distance.

    The mean distance from ``x_i`` to the members of cluster ``c`` is ``1 - x_i . mean_c`` (its own cluster
    excludes ``x_i``: ``1 - (n_c x_i . mean_c - 1) / (n_c - 1)``). Singletons score 0; one cluster scores 0.
    """
    n = x.shape[0]
    counts = torch.bincount(codes, minlength=k).double()
    used = counts > 0
    if int(used.sum()) < 2:
        return 0.0
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, codes, x.double())
    dots = x.double() @ sums.T  # [N, K]: x_i . sum_c
    own = counts[codes]
    a = 1.0 - (dots.gather(1, codes[:, None]).squeeze(1) - 1.0) / (own - 1.0).clamp_min(1.0)
    mean_dist = 1.0 - dots / counts.clamp_min(1.0)
    mean_dist[:, ~used] = float("inf")
    mean_dist[torch.arange(n, device=x.device), codes] = float("inf")
    b = mean_dist.min(dim=1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s = torch.where(own > 1, s, torch.zeros_like(s))
    return float(s.mean())


def elbow(candidates: list[int], distortions: list[float]) -> int:
    """The candidate ``K`` at the largest second difference of the distortion (the code's rule, with the
    candidate offset applied). Fewer than three candidates: the smallest one whose distortion is within
    1e-9 relative of the last (no curvature to read)."""
    if len(candidates) != len(distortions) or not candidates:
        raise ValueError("`candidates` and `distortions` must be non-empty and of the same length")
    if len(candidates) < 3:
        last = distortions[-1]
        for kk, d in zip(candidates, distortions):
            if d <= last + 1e-9 * max(1.0, abs(last)):
                return kk
        return candidates[-1]  # pragma: no cover - the last candidate always qualifies
    d = torch.tensor(distortions, dtype=torch.float64)
    second = d[2:] - 2.0 * d[1:-1] + d[:-2]
    return candidates[int(torch.argmax(second)) + 1]


@dataclass
class Codebook:
    """The clustering of one item's content tokens.

    Attributes:
        centroids: ``[K, D]`` unit codewords the tokens were assigned to (float32).
        codes: ``[N]`` nearest codeword of every token (through ``kernels.codebook_assign``).
        similarity: ``[N]`` cosine similarity of every token to its codeword.
        k: the ``K`` clustered with (codes may leave some codewords unused).
        scores: adaptive mode: ``{K: distortion or silhouette}`` of every candidate.
    """

    centroids: torch.Tensor
    codes: torch.Tensor
    similarity: torch.Tensor
    k: int
    scores: dict[int, float] = field(default_factory=dict)


def fit(
    x_unit: torch.Tensor,
    k: int,
    *,
    seed: int,
    max_iter: int,
    tol: float,
    threads: int,
    use_gpu: bool | None,
    kmeans: str = "auto",
) -> Codebook:
    """Cluster unit vectors into ``k`` codewords and assign every vector to its nearest one."""
    generator = torch.Generator().manual_seed(int(seed))
    centroids = spherical_kmeans(
        x_unit,
        k,
        generator=generator,
        max_iter=max_iter,
        tol=tol,
        threads=threads,
        use_gpu=use_gpu,
        kmeans=kmeans,
    )
    codes, sim = assign(x_unit, centroids)
    return Codebook(centroids, codes, sim, k)


def build_codebook(
    x: torch.Tensor,
    k: int | None,
    *,
    adaptive: str = "elbow",
    k_min: int = 12,
    k_max: int = 32,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
    threads: int = 1,
    use_gpu: bool | None = None,
    kmeans: str = "auto",
) -> Codebook:
    """Codebook of the tokens ``x: [N, D]``: ``k`` codewords, or an adaptive ``K`` in ``[k_min, k_max]``.

    Every candidate is clustered from the same seed. Bounds above the number of distinct tokens are
    clipped to it (k-means cannot place more distinct centroids than there are distinct points).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty [N, D] token matrix, got shape {tuple(x.shape)}")
    unit = normalize(x)
    distinct = int(torch.unique(unit, dim=0).shape[0])
    common = dict(seed=seed, max_iter=max_iter, tol=tol, threads=threads, use_gpu=use_gpu, kmeans=kmeans)
    if k is not None:
        return fit(unit, max(1, min(int(k), distinct)), **common)
    if adaptive not in ADAPTIVE:
        raise ValueError(f"`adaptive` must be one of {ADAPTIVE}, got {adaptive!r}")
    hi = max(1, min(k_max, distinct))
    lo = max(1 if adaptive == "elbow" else 2, min(k_min, hi))
    if adaptive == "silhouette" and hi < 2:
        return fit(unit, 1, **common)
    candidates = list(range(lo, hi + 1))
    fits = {kk: fit(unit, kk, **common) for kk in candidates}
    if adaptive == "elbow":
        scores = {kk: distortion(f.similarity) for kk, f in fits.items()}
        best = elbow(candidates, [scores[kk] for kk in candidates])
    else:
        scores = {kk: silhouette(unit, f.codes, kk) for kk, f in fits.items()}
        best = max(candidates, key=lambda kk: (scores[kk], -kk))
    chosen = fits[best]
    chosen.scores = scores
    return chosen
