"""CUDA source of the GPU backend's kernels, compiled at run time by CuPy (NVRTC).

Each kernel indexes its threads by ``blockIdx.x * blockDim.x + threadIdx.x`` alone and its
threads never talk to each other, so the same source also runs on a CPU: the tests compile
it with a C compiler and run each launch's real grid and blocks, threads in a shuffled order
and then again reversed, to catch indexing bugs and races (``tests/fake_cupy.py``).

=============  ==========================================================================
kernel         one thread per
=============  ==========================================================================
plane_dots     (query, code): ``T`` of ``core.codes.plane_dots``
score_keys     (query-leaf pair, slot): the estimate of a code as a ``topk`` key, and its
               error bound
beam_route     query: the beam search of ``search.route.route`` over precomputed scores
top_k          query: the best k of its reranked candidates
=============  ==========================================================================
"""

__all__ = ["SOURCE"]

SOURCE = r"""
#define FMAX 3.4028234663852886e+38f
#define NO_KEY 0xFFFFFFFFFFFFFFFFULL

/* T = sum_{c, j} 2^(c + j) popcount(code bit c & plane_j) of code `slot` of word-major
   `codes` (code_bits * w, n), bit c in rows c * w .. (c + 1) * w, with the planes_n planes
   of w words at `planes`. */
__device__ __forceinline__ unsigned int plane_dot(
    const unsigned long long* codes, const long long n, const long long slot, const int w,
    const int code_bits, const unsigned long long* planes, const int planes_n)
{
    unsigned int total = 0;
    for (int c = code_bits - 1; c >= 0; --c) {
        const unsigned long long* bit = codes + (long long)c * w * n;
        unsigned int part = 0;
        for (int j = planes_n - 1; j >= 0; --j) {
            const unsigned long long* plane = planes + (long long)j * w;
            int h = 0;
            for (int k = 0; k < w; ++k) h += __popcll(bit[k * n + slot] & plane[k]);
            part = (part << 1) + (unsigned int)h;
        }
        total = (total << 1) + part;
    }
    return total;
}

extern "C" __global__ void plane_dots(
    const unsigned long long* codes, const long long n, const int w, const int code_bits,
    const int planes_n, const unsigned long long* planes, const long long nq,
    unsigned int* out)
{
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nq * n) return;
    const long long q = t / n, row = t % n;
    out[t] = plane_dot(codes, n, row, w, code_bits, planes + q * planes_n * w, planes_n);
}

/* Slots of leaf l: base[l]..base[l+1] of the base part, then delta[l]..delta[l+1] of the
   delta part. A base slot is its own storage row when base_rows is null. row_ok (when
   use_ok) masks storage rows. factors_*: (4, n) rows A, M, B, E of core.codes. Pair p is
   query p / n_slots; planes: (nq, planes_n, w); lo, step, total, slack: (nq,); p_term, r_q:
   (pairs,). One thread per (pair, j < max_rows); writes the key and the radius. */
extern "C" __global__ void score_keys(
    const unsigned long long* codes_b, const long long n_b,
    const unsigned long long* codes_d, const long long n_d, const int w, const int code_bits,
    const float* factors_b, const float* factors_d,
    const long long* rows_b, const int rows_b_given, const long long* rows_d,
    const long long* base, const long long* delta,
    const unsigned char* row_ok, const int use_ok,
    const long long* pair_leaf, const long long n_slots,
    const unsigned long long* planes, const int planes_n,
    const float* lo, const float* step, const float* total, const float* slack,
    const float* p_term, const float* r_q,
    const int max_rows, const long long pairs, unsigned long long* keys, float* radius)
{
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= pairs * max_rows) return;
    const long long p = t / max_rows;
    const long long leaf = pair_leaf[p];
    radius[t] = 0.0f;
    if (leaf < 0) { keys[t] = NO_KEY; return; }
    const long long j = t % max_rows;
    const long long in_base = base[leaf + 1] - base[leaf];
    const unsigned long long* codes;
    const float* factors;
    long long n, slot, row;
    if (j < in_base) {
        slot = base[leaf] + j;
        codes = codes_b; n = n_b; factors = factors_b;
        row = rows_b_given ? rows_b[slot] : slot;
    } else {
        slot = delta[leaf] + (j - in_base);
        if (slot >= delta[leaf + 1]) { keys[t] = NO_KEY; return; }
        codes = codes_d; n = n_d; factors = factors_d;
        row = rows_d[slot];
    }
    if (use_ok && !row_ok[row]) { keys[t] = NO_KEY; return; }
    const long long q = p / n_slots;
    const unsigned int dot =
        plane_dot(codes, n, slot, w, code_bits, planes + q * planes_n * w, planes_n);
    /* The same float32 steps, in the same order, as codes.estimate. */
    float out = (float)dot;
    out = out * 2.0f;
    out = out - total[q];
    out = out * step[q];
    out = out * factors[n + slot];          /* M */
    out = out - factors[slot];              /* A */
    out = out - p_term[p];
    const float low = factors[2 * n + slot] * lo[q];  /* B * lo */
    out = out + low;
    out = -out;
    const float spread = factors[3 * n + slot] * r_q[p];  /* E * r_q */
    radius[t] = spread + factors[n + slot] * slack[q];   /* + M * slack */
    if (isnan(out)) out = FMAX;
    else if (isinf(out)) out = out > 0.0f ? FMAX : -FMAX;
    out = out + 0.0f;
    const unsigned int bits = __float_as_uint(out);
    const unsigned int ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    keys[t] = ((unsigned long long)ordered << 32) | (unsigned long long)row;
}

/* Beam search as search.route.route, one thread per query. scores: (nq, stride) routing
   scores, column = node; children: (n_nodes, B), -1 padded; scratch: (nq, 2 * probes * B);
   out: (nq, depth * probes) leaves, found ones first, then -1; held: (nq,) rows of the
   found leaves by sizes. Each level keeps the `probes` best nodes, ties to the lower id. */
extern "C" __global__ void beam_route(
    const float* scores, const long long stride,
    const long long* children, const int branching, const long long* leaf_of_node,
    const long long* sizes, const int probes, const int depth, const long long nq,
    long long* scratch, long long* out, long long* held)
{
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= nq) return;
    const long long width = (long long)probes * branching;
    long long* cur = scratch + q * 2 * width;
    long long* nxt = cur + width;
    const float* s = scores + q * stride;
    long long* leaves = out + q * (long long)depth * probes;
    long long f = 0, found = 0, rows = 0;
    for (int c = 0; c < branching; ++c) {
        if (children[c] >= 0) cur[f++] = children[c];
    }
    for (int level = 0; level < depth && f > 0; ++level) {
        const long long keep = f < probes ? f : probes;
        for (long long i = 0; i < keep; ++i) {
            long long best = i;
            for (long long j = i + 1; j < f; ++j) {
                const float sj = s[cur[j]], sb = s[cur[best]];
                if (sj < sb || (sj == sb && cur[j] < cur[best])) best = j;
            }
            const long long tmp = cur[i]; cur[i] = cur[best]; cur[best] = tmp;
        }
        long long nf = 0;
        for (long long i = 0; i < keep; ++i) {
            const long long node = cur[i];
            const long long leaf = leaf_of_node[node];
            if (leaf >= 0) {
                leaves[found++] = leaf;
                rows += sizes[leaf];
            } else {
                for (int c = 0; c < branching; ++c) {
                    const long long child = children[node * branching + c];
                    if (child >= 0) nxt[nf++] = child;
                }
            }
        }
        long long* tmp = cur; cur = nxt; nxt = tmp;
        f = nf;
    }
    for (long long i = found; i < (long long)depth * probes; ++i) leaves[i] = -1;
    held[q] = rows;
}

/* The k best of each query's m candidates by (distance, row), as search.rerank.rerank: one thread
   per query, insertion into its sorted output. dist: (nq, m); rows: (nq, m), -1 for none;
   out_rows, out_dist: (nq, k), padded with -1 and inf. */
extern "C" __global__ void top_k(
    const float* dist, const long long* rows, const int m, const int k, const long long nq,
    long long* out_rows, float* out_dist)
{
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= nq) return;
    const float* d = dist + q * m;
    const long long* r = rows + q * m;
    long long* best_rows = out_rows + q * k;
    float* best = out_dist + q * k;
    int n = 0;
    for (int j = 0; j < m; ++j) {
        const long long row = r[j];
        const float v = d[j] + 0.0f;  /* -0.0 ties with +0.0 and falls back on the row */
        if (row < 0 || isinf(v) || isnan(v)) continue;
        if (n == k && !(v < best[k - 1] || (v == best[k - 1] && row < best_rows[k - 1])))
            continue;
        int i = n < k ? n++ : k - 1;
        while (i > 0 && (best[i - 1] > v || (best[i - 1] == v && best_rows[i - 1] > row))) {
            best[i] = best[i - 1];
            best_rows[i] = best_rows[i - 1];
            --i;
        }
        best[i] = v;
        best_rows[i] = row;
    }
    for (int i = n; i < k; ++i) {
        best[i] = __int_as_float(0x7f800000);
        best_rows[i] = -1;
    }
}
"""
