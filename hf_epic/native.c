/* Fused CPU kernels of the euclidean similarity s(a, b) = exp(-||a - b|| / D) (hf_epic.native).
 *
 * Compiled by hf_epic/native.py for one embedding dimension DIM (so that the dot products unroll)
 * with -ffp-contract=off and without -ffast-math: every operation is one IEEE operation, so a
 * similarity has the same bits wherever it is computed (a block, a column, a fused sum, vector or
 * scalar code), which exact greedy needs. For rows a, b (float64, centred) with squared norms
 * sa, sb:
 *
 *     d2 = (sa + sb) - 2 * dot(a, b)             dot: fma over k = 0..DIM-1, in order
 *     s  = (float) exp(sqrt(max(0, d2)) * (-1 / DIM))        in float64, rounded to float32 once
 *     s  = rint(s * 2^24) * 2^-24                 only with quantize (similarities below 0.5)
 *
 * exp is evaluated as 2^k * p(r), k = rint(t / ln 2), r = t - k ln 2 in two steps (|r| <= ln 2 / 2),
 * p the Taylor polynomial of degree 13 (truncation below 1e-17): within about one unit in the
 * last place of float64, so its float32 rounding is the correctly rounded exp except in about one
 * case in 10^8. torch computes the same definition from its own float64 exp
 * (EuclideanKernel.from_sq_distance); the two agree in practice bit for bit.
 *
 * Sums are float64: similarities are multiples of 2^-24 in [0, 1], so every sum below 2^29 is
 * exact in any order (the vectorised reductions reorder them).
 */
#include <math.h>
#include <stdint.h>

#ifndef DIM
#error "compile with -DDIM=<embedding dimension>"
#endif

#define CHUNK 256 /* columns per chunk: their coordinates stay in the L1 cache across the rows */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define CLAMP(s, lo, hi) MIN(MAX((s), (lo)), (hi))


static inline double exp_nonpositive(double t) {
    t = t < -700.0 ? -700.0 : t;
    double kd = rint(t * 1.4426950408889634);
    double r = fma(kd, -6.93147180369123816490e-01, t);
    r = fma(kd, -1.90821492927058770002e-10, r);
    double p = 1.0 / 6227020800.0;
    p = fma(p, r, 1.0 / 479001600.0);
    p = fma(p, r, 1.0 / 39916800.0);
    p = fma(p, r, 1.0 / 3628800.0);
    p = fma(p, r, 1.0 / 362880.0);
    p = fma(p, r, 1.0 / 40320.0);
    p = fma(p, r, 1.0 / 5040.0);
    p = fma(p, r, 1.0 / 720.0);
    p = fma(p, r, 1.0 / 120.0);
    p = fma(p, r, 1.0 / 24.0);
    p = fma(p, r, 1.0 / 6.0);
    p = fma(p, r, 0.5);
    p = fma(p, r, 1.0);
    p = fma(p, r, 1.0);
    /* 2^k: k + 1023 in the exponent bits (the low bits of kd + 1.5 * 2^52 hold k) */
    union {
        double d;
        uint64_t u;
    } v;
    v.d = kd + 6755399441055744.0;
    v.u = (v.u + 1023u) << 52;
    return p * v.d;
}

static inline float similarity(double d2, const int quantize) {
    d2 = d2 > 0.0 ? d2 : 0.0;
    float s = (float)exp_nonpositive(sqrt(d2) * (-1.0 / DIM));
    if (quantize) s = rintf(s * 16777216.0f) * 5.9604644775390625e-08f;
    return s;
}

static inline double dot_at(const double *a, const double *bt, long ldb, long j) {
    double d = 0.0;
    _Pragma("GCC unroll 64") for (long k = 0; k < DIM; k++) d = fma(a[k], bt[k * ldb + j], d);
    return d;
}

/* out[i * ldo + j] = s(row i of xa, column j of xbt): xa m x DIM, xbt DIM x k with row stride ldb */
static inline void block(const double *restrict xa, const double *restrict sqa, const double *restrict xbt,
                         long ldb, const double *restrict sqb, long m, long k, const int quantize,
                         float *restrict out, long ldo) {
    for (long j0 = 0; j0 < k; j0 += CHUNK) {
        long j1 = MIN(k, j0 + CHUNK);
        for (long i = 0; i < m; i++) {
            const double *a = xa + i * DIM;
            double sa = sqa[i];
            float *o = out + i * ldo;
#pragma omp simd
            for (long j = j0; j < j1; j++) o[j] = similarity((sa + sqb[j]) - 2.0 * dot_at(a, xbt, ldb, j), quantize);
        }
    }
}

void epic_block(const double *xa, const double *sqa, const double *xbt, long ldb, const double *sqb, long m,
                long k, int quantize, float *out, long ldo) {
    if (quantize)
        block(xa, sqa, xbt, ldb, sqb, m, k, 1, out, ldo);
    else
        block(xa, sqa, xbt, ldb, sqb, m, k, 0, out, ldo);
}

/* One band of rows [r0, r1) of a class of n rows (x n x DIM, xt its transpose, sq the squared
 * norms), against every row c >= r0, using s(i, c) = s(c, i) for both columns:
 *   plain:   tot0[c] += sum_i s(i, c)
 *   clamped: tot1[c] += sum_i clamp(s(i, c), lo_i, hi_i)
 * over every row i of the class that pairs with c inside the band's part of the upper triangle,
 * the diagonal included (s(i, i) = 1). Summed over all bands, these are the full column sums. */
static inline void band(const double *restrict x, const double *restrict xt, const double *restrict sq, long n,
                        long r0, long r1, const int quantize, const int plain, const int clamped,
                        const float *restrict lo, const float *restrict hi, double *restrict tot0,
                        double *restrict tot1) {
    for (long i = r0; i < r1; i++) {
        if (plain) tot0[i] += 1.0;
        if (clamped) tot1[i] += CLAMP(1.0f, lo[i], hi[i]);
    }
    for (long j0 = r0 + 1; j0 < n; j0 += CHUNK) {
        long j1 = MIN(n, j0 + CHUNK);
        for (long i = r0; i < r1 && i + 1 < j1; i++) {
            const double *a = x + i * DIM;
            double sa = sq[i];
            float loi = clamped ? lo[i] : 0.0f, hii = clamped ? hi[i] : 1.0f;
            double acc0 = 0.0, acc1 = 0.0;
            long js = MAX(i + 1, j0);
            if (plain && !clamped) {
#pragma omp simd reduction(+ : acc0)
                for (long j = js; j < j1; j++) {
                    float s = similarity((sa + sq[j]) - 2.0 * dot_at(a, xt, n, j), quantize);
                    acc0 += s;
                    tot0[j] += s;
                }
            } else if (clamped && !plain) {
#pragma omp simd reduction(+ : acc1)
                for (long j = js; j < j1; j++) {
                    float s = similarity((sa + sq[j]) - 2.0 * dot_at(a, xt, n, j), quantize);
                    acc1 += CLAMP(s, lo[j], hi[j]);
                    tot1[j] += CLAMP(s, loi, hii);
                }
            } else {
#pragma omp simd reduction(+ : acc0, acc1)
                for (long j = js; j < j1; j++) {
                    float s = similarity((sa + sq[j]) - 2.0 * dot_at(a, xt, n, j), quantize);
                    acc0 += s;
                    tot0[j] += s;
                    acc1 += CLAMP(s, lo[j], hi[j]);
                    tot1[j] += CLAMP(s, loi, hii);
                }
            }
            if (plain) tot0[i] += acc0;
            if (clamped) tot1[i] += acc1;
        }
    }
}

/* mode 0: plain sums into tot (length n); mode 1: clamped sums into tot; mode 2: plain sums into
 * tot[0:n] and clamped ones into tot[n:2n] */
void epic_band_sums(const double *x, const double *xt, const double *sq, long n, long r0, long r1, int quantize,
                    int mode, const float *lo, const float *hi, double *tot) {
    if (quantize) {
        if (mode == 0) band(x, xt, sq, n, r0, r1, 1, 1, 0, lo, hi, tot, tot);
        if (mode == 1) band(x, xt, sq, n, r0, r1, 1, 0, 1, lo, hi, tot, tot);
        if (mode == 2) band(x, xt, sq, n, r0, r1, 1, 1, 1, lo, hi, tot, tot + n);
    } else {
        if (mode == 0) band(x, xt, sq, n, r0, r1, 0, 1, 0, lo, hi, tot, tot);
        if (mode == 1) band(x, xt, sq, n, r0, r1, 0, 0, 1, lo, hi, tot, tot);
        if (mode == 2) band(x, xt, sq, n, r0, r1, 0, 1, 1, lo, hi, tot, tot + n);
    }
}

/* tot[c] += sum_i clamp(s(i, c), lo_i, hi_i) for rows xa (m x DIM) and columns xbt (DIM x k, row
 * stride ldb); own[i] < k is row i's own column, where s = 1 exactly */
static inline void clamped_sums(const double *restrict xa, const double *restrict sqa, const float *restrict lo,
                                const float *restrict hi, const int64_t *restrict own, long m,
                                const double *restrict xbt, long ldb, const double *restrict sqb, long k,
                                const int quantize, double *restrict tot) {
    for (long j0 = 0; j0 < k; j0 += CHUNK) {
        long j1 = MIN(k, j0 + CHUNK);
        for (long i = 0; i < m; i++) {
            const double *a = xa + i * DIM;
            double sa = sqa[i];
            float loi = lo[i], hii = hi[i];
#pragma omp simd
            for (long j = j0; j < j1; j++) {
                float s = similarity((sa + sqb[j]) - 2.0 * dot_at(a, xbt, ldb, j), quantize);
                tot[j] += CLAMP(s, loi, hii);
            }
        }
    }
    for (long i = 0; i < m; i++) {
        long c = (long)own[i];
        if (c < 0 || c >= k) continue;
        float s = similarity((sqa[i] + sqb[c]) - 2.0 * dot_at(xa + i * DIM, xbt, ldb, c), quantize);
        tot[c] += (double)CLAMP(1.0f, lo[i], hi[i]) - (double)CLAMP(s, lo[i], hi[i]);
    }
}

void epic_clamped_sums(const double *xa, const double *sqa, const float *lo, const float *hi, const int64_t *own,
                       long m, const double *xbt, long ldb, const double *sqb, long k, int quantize, double *tot) {
    if (quantize)
        clamped_sums(xa, sqa, lo, hi, own, m, xbt, ldb, sqb, k, 1, tot);
    else
        clamped_sums(xa, sqa, lo, hi, own, m, xbt, ldb, sqb, k, 0, tot);
}

/* col[i] = s(i, j) for the rows i in [r0, r1) of a class (xj, sqj: row j; col[j] = 1 exactly), and,
 * with cur, the rows whose similarity to j exceeds cur[i], ascending, in changed; returns their count */
static inline long column(const double *restrict xj, double sqj, const double *restrict xt,
                          const double *restrict sq, long n, long r0, long r1, long own, const int quantize,
                          const float *restrict cur, float *restrict col, int64_t *restrict changed) {
    long count = 0;
    for (long i0 = r0; i0 < r1; i0 += CHUNK) {
        long i1 = MIN(r1, i0 + CHUNK);
#pragma omp simd
        for (long i = i0; i < i1; i++) col[i] = similarity((sqj + sq[i]) - 2.0 * dot_at(xj, xt, n, i), quantize);
        if (own >= i0 && own < i1) col[own] = 1.0f;
        if (cur)
            for (long i = i0; i < i1; i++)
                if (col[i] > cur[i]) changed[count++] = i;
    }
    return count;
}

long epic_column(const double *xj, double sqj, const double *xt, const double *sq, long n, long r0, long r1, long own,
                 int quantize, const float *cur, float *col, int64_t *changed) {
    if (quantize) return column(xj, sqj, xt, sq, n, r0, r1, own, 1, cur, col, changed);
    return column(xj, sqj, xt, sq, n, r0, r1, own, 0, cur, col, changed);
}

/* out[p * L + r] = s(row r of cell cell[p], row cands[p]) for the k-d cells of hf_epic.cells: cell_xt
 * holds each cell's rows transposed (cells x DIM x L), cell_sq their squared norms (cells x L) */
static inline void cell_pairs(const double *restrict cell_xt, const double *restrict cell_sq,
                              const int64_t *restrict cell, const double *restrict x, const double *restrict sq,
                              const int64_t *restrict cands, long P, long L, const int quantize,
                              float *restrict out) {
    for (long p = 0; p < P; p++) {
        const double *a = x + cands[p] * DIM;
        double sa = sq[cands[p]];
        const double *bt = cell_xt + cell[p] * DIM * L;
        const double *sb = cell_sq + cell[p] * L;
        float *o = out + p * L;
#pragma omp simd
        for (long r = 0; r < L; r++) o[r] = similarity((sa + sb[r]) - 2.0 * dot_at(a, bt, L, r), quantize);
    }
}

void epic_cell_pairs(const double *cell_xt, const double *cell_sq, const int64_t *cell, const double *x,
                     const double *sq, const int64_t *cands, long P, long L, int quantize, float *out) {
    if (quantize)
        cell_pairs(cell_xt, cell_sq, cell, x, sq, cands, P, L, 1, out);
    else
        cell_pairs(cell_xt, cell_sq, cell, x, sq, cands, P, L, 0, out);
}
