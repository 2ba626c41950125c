/* Sparse convolution and matmul kernels over the active weights only (float32, CPU).
 *
 * Layout. Activations are repacked so that the batch is the innermost dimension: an NCHW input becomes
 * X[p][c][i][j][b] ("phase planes"), where p = (ph, pw) splits a stride-s input into s*s sub-images, so that
 * every strided, dilated, padded convolution becomes a stride-1 correlation over contiguous memory:
 *
 *     Y[oc][oh][ow*B + b] = sum_k w_k * X[cp_k][oh + dh_k][(ow + dw_k)*B + b]
 *
 * with one (cp_k, dh_k, dw_k) per active weight k = (oc, ic, kh, kw). For a fixed output row the inner span
 * (ow, b) is one contiguous vector of length OW*B, whatever the batch size, stride, padding or dilation: the
 * kernels below are register-tiled AXPYs (forward, input gradient) and dot products (weight gradient) over such
 * spans, with the per-weight offset off_k = cp_k*plane + dh_k*row + dw_k*col precomputed per input geometry.
 *
 * Work is split over (band of output rows, output channel): a band's input rows stay in L2 while every output
 * channel reads them. Threads: OpenMP, the count passed by the caller (torch.get_num_threads()).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define VL 16

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float hsum(vf v) {
    typedef int32_t vi16 __attribute__((vector_size(64)));
    v += __builtin_shuffle(v, (vi16){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (vi16){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, (vi16){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    return v[0] + v[1];
}

/* a[0..7] += sum_k w[k] * (base + offs[k])[0 : 8*VL]: one 128-float tile, eight accumulators in registers */
static inline void tile8(vf *restrict a, const float *restrict base, const int32_t *restrict offs,
                         const float *restrict w, int64_t k0, int64_t k1) {
    vf a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], a4 = a[4], a5 = a[5], a6 = a[6], a7 = a[7];
    for (int64_t k = k0; k < k1; k++) {
        const float *p = base + offs[k];
        const float x = w[k];
        a0 += x * ld(p);
        a1 += x * ld(p + VL);
        a2 += x * ld(p + 2 * VL);
        a3 += x * ld(p + 3 * VL);
        a4 += x * ld(p + 4 * VL);
        a5 += x * ld(p + 5 * VL);
        a6 += x * ld(p + 6 * VL);
        a7 += x * ld(p + 7 * VL);
    }
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3, a[4] = a4, a[5] = a5, a[6] = a6, a[7] = a7;
}

/* The fused epilogue of a result vector: + the residual's vector at the same position (res may be NULL), then
 * max(., 0) when relu (NaN stays NaN, as torch.relu). */
static inline vf epi(vf v, const float *res, int relu) {
    if (res) v += ld(res);
    if (relu) v = (vf)((vi)v & ~(vi)(v < 0));
    return v;
}

/* As epi for the first n < VL floats: the residual is read only there (it has no slack past its end). */
static inline vf epi_part(vf v, const float *res, int64_t n, int relu) {
    if (res) {
        vf r = {0};
        memcpy(&r, res, (size_t)n * sizeof(float));
        v += r;
    }
    if (relu) v = (vf)((vi)v & ~(vi)(v < 0));
    return v;
}

/* out[0:L] = epilogue(b + sum_k w[k] * (base + offs[k])[0:L]), the epilogue adding res[0:L] (when res is not
 * NULL) and applying ReLU (when relu) */
static void row_axpy(float *restrict out, const float *restrict base, const int32_t *restrict offs,
                     const float *restrict w, int64_t nnz, int64_t L, float b, const float *res, int relu) {
    const vf bv = (vf){0} + b;
    int64_t u = 0;
    for (; u + 8 * VL <= L; u += 8 * VL) {
        vf a[8] = {bv, bv, bv, bv, bv, bv, bv, bv};
        tile8(a, base + u, offs, w, 0, nnz);
        for (int j = 0; j < 8; j++) st(out + u + j * VL, epi(a[j], res ? res + u + j * VL : NULL, relu));
    }
    for (; u + 2 * VL <= L; u += 2 * VL) {
        /* four partial sums over k per vector: eight independent FMA chains */
        vf a0 = bv, a1 = bv, b0 = {0}, b1 = {0}, c0 = {0}, c1 = {0}, e0 = {0}, e1 = {0};
        int64_t k = 0;
        for (; k + 4 <= nnz; k += 4) {
            const float *p0 = base + offs[k] + u, *p1 = base + offs[k + 1] + u, *p2 = base + offs[k + 2] + u,
                        *p3 = base + offs[k + 3] + u;
            a0 += w[k] * ld(p0);
            a1 += w[k] * ld(p0 + VL);
            b0 += w[k + 1] * ld(p1);
            b1 += w[k + 1] * ld(p1 + VL);
            c0 += w[k + 2] * ld(p2);
            c1 += w[k + 2] * ld(p2 + VL);
            e0 += w[k + 3] * ld(p3);
            e1 += w[k + 3] * ld(p3 + VL);
        }
        for (; k < nnz; k++) {
            const float *p = base + offs[k] + u;
            a0 += w[k] * ld(p);
            a1 += w[k] * ld(p + VL);
        }
        st(out + u, epi((a0 + b0) + (c0 + e0), res ? res + u : NULL, relu));
        st(out + u + VL, epi((a1 + b1) + (c1 + e1), res ? res + u + VL : NULL, relu));
    }
    for (; u + VL <= L; u += VL) {
        vf a0 = bv, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t k = 0;
        for (; k + 4 <= nnz; k += 4) {
            a0 += w[k] * ld(base + offs[k] + u);
            a1 += w[k + 1] * ld(base + offs[k + 1] + u);
            a2 += w[k + 2] * ld(base + offs[k + 2] + u);
            a3 += w[k + 3] * ld(base + offs[k + 3] + u);
        }
        for (; k < nnz; k++) a0 += w[k] * ld(base + offs[k] + u);
        st(out + u, epi((a0 + a1) + (a2 + a3), res ? res + u : NULL, relu));
    }
    if (u < L) {
        /* the last rem < VL floats: whole vectors, the lanes past L discarded (inputs carry VL floats of slack
         * past their end, see the callers) */
        const int64_t rem = L - u;
        vf a0 = bv, a1 = {0};
        int64_t k = 0;
        for (; k + 2 <= nnz; k += 2) {
            a0 += w[k] * ld(base + offs[k] + u);
            a1 += w[k + 1] * ld(base + offs[k + 1] + u);
        }
        if (k < nnz) a0 += w[k] * ld(base + offs[k] + u);
        const vf r = epi_part(a0 + a1, res ? res + u : NULL, rem, relu);
        memcpy(out + u, &r, rem * sizeof(float));
    }
}

/* out[0..3] = (hsum(s0), hsum(s1), hsum(s2), hsum(s3)) + (e0, e1, e2, e3), with 8 shuffles instead of 12 */
static inline void hsum4_store(float *out, vf s0, vf s1, vf s2, vf s3, float e0, float e1, float e2, float e3) {
    const vi lo = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi hi = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vf a = __builtin_shuffle(s0, s1, lo) + __builtin_shuffle(s0, s1, hi); /* s0 | s1, 8 lanes each */
    const vf b = __builtin_shuffle(s2, s3, lo) + __builtin_shuffle(s2, s3, hi);
    const vi lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vi hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    vf c = __builtin_shuffle(a, b, lo4) + __builtin_shuffle(a, b, hi4); /* 4 lanes each: s0 | s1 | s2 | s3 */
    c += __builtin_shuffle(c, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    c += __builtin_shuffle(c, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    out[0] = c[0] + e0;
    out[1] = c[4] + e1;
    out[2] = c[8] + e2;
    out[3] = c[12] + e3;
}

/* out[k] = sum over rows i < ni and u < L of dy[i*dy_row + u] * x[offs[k] + i*x_row + u], for every k: four
 * weights share each load of dy, two vectors per step keep eight independent accumulators in flight, one
 * horizontal sum per weight. The sums are stored, not added to `out`: loads from a buffer zeroed just before
 * stall (they are not forwarded from memset's stores), which cost half of the weight-gradient kernel's time. */
static void row_dots(float *restrict out, const float *restrict dy, int64_t dy_row, const float *restrict xbase,
                     int64_t x_row, const int32_t *restrict offs, int64_t nnz, int64_t ni, int64_t L) {
    const int64_t Lv = L - L % (2 * VL);
    int64_t k = 0;
    for (; k + 4 <= nnz; k += 4) {
        vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
        float r0 = 0.f, r1 = 0.f, r2 = 0.f, r3 = 0.f;
        for (int64_t i = 0; i < ni; i++) {
            const float *d = dy + i * dy_row;
            const float *p0 = xbase + offs[k] + i * x_row, *p1 = xbase + offs[k + 1] + i * x_row,
                        *p2 = xbase + offs[k + 2] + i * x_row, *p3 = xbase + offs[k + 3] + i * x_row;
            for (int64_t u = 0; u < Lv; u += 2 * VL) {
                const vf d0 = ld(d + u), d1 = ld(d + u + VL);
                s0 += d0 * ld(p0 + u);
                s1 += d0 * ld(p1 + u);
                s2 += d0 * ld(p2 + u);
                s3 += d0 * ld(p3 + u);
                t0 += d1 * ld(p0 + u + VL);
                t1 += d1 * ld(p1 + u + VL);
                t2 += d1 * ld(p2 + u + VL);
                t3 += d1 * ld(p3 + u + VL);
            }
            for (int64_t u = Lv; u < L; u++) {
                r0 += d[u] * p0[u];
                r1 += d[u] * p1[u];
                r2 += d[u] * p2[u];
                r3 += d[u] * p3[u];
            }
        }
        hsum4_store(out + k, s0 + t0, s1 + t1, s2 + t2, s3 + t3, r0, r1, r2, r3);
    }
    for (; k < nnz; k++) {
        vf s = {0}, t = {0};
        float r = 0.f;
        for (int64_t i = 0; i < ni; i++) {
            const float *d = dy + i * dy_row, *p = xbase + offs[k] + i * x_row;
            for (int64_t u = 0; u < Lv; u += 2 * VL) {
                s += ld(d + u) * ld(p + u);
                t += ld(d + u + VL) * ld(p + u + VL);
            }
            for (int64_t u = Lv; u < L; u++) r += d[u] * p[u];
        }
        out[k] = r + hsum(s + t);
    }
}

/* vals[k] = w[idx[k]] (the active weights in one order). Each thread gathers one contiguous part and requests
 * the line it will read GATHER_AHEAD weights later: the hardware prefetcher does not follow the gaps between
 * active weights (4096x4096 weight, 2 threads: 0.84 -> 0.43 ms at density 0.01, 2.6 -> 1.9 ms at 0.05). */
#define GATHER_AHEAD 128
void er_gather(const float *w, const int32_t *idx, int64_t n, float *vals, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (n > 65536)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t k1 = n * (t + 1) / nt;
        int64_t k = n * t / nt;
        for (; k + GATHER_AHEAD < k1; k++) {
            __builtin_prefetch(w + idx[k + GATHER_AHEAD], 0, 3);
            vals[k] = w[idx[k]];
        }
        for (; k < k1; k++) vals[k] = w[idx[k]];
    }
}

void er_offsets(int64_t n, const int32_t *cp, const int32_t *dh, const int32_t *dw, int64_t plane, int64_t row,
                int64_t col, int32_t *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > 65536)
    for (int64_t k = 0; k < n; k++)
        out[k] = (int32_t)((int64_t)cp[k] * plane + (int64_t)dh[k] * row + (int64_t)dw[k] * col);
}

/* out[r*out_plane + i*out_row + u] = bias[r] + sum_{k in row r} vals[k] * in[offs[k] + i*in_row + u]
 * for r < nrows, i < n_i, u < L (bias may be NULL); rows of output are processed in bands of `band` rows.
 * `in` must stay readable for VL floats past the last element a span reads (the spans' tails are computed as
 * whole vectors). */
void er_spmm(int64_t nrows, const int64_t *row_ptr, const int32_t *offs, const float *vals, const float *in,
             int64_t in_row, float *out, int64_t out_plane, int64_t out_row, int64_t n_i, int64_t L, int64_t band,
             const float *bias, const float *res, int64_t res_plane, int64_t res_row, int relu, int nthreads) {
    if (band < 1) band = 1;
    const int64_t nb = (n_i + band - 1) / band;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(dynamic, 4)
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t r = 0; r < nrows; r++) {
            const int64_t k0 = row_ptr[r], nnz = row_ptr[r + 1] - k0;
            const int64_t i1 = (b + 1) * band < n_i ? (b + 1) * band : n_i;
            for (int64_t i = b * band; i < i1; i++) {
                float *o = out + r * out_plane + i * out_row;
                const float *rs = res ? res + r * res_plane + i * res_row : NULL;
                const float b = bias ? bias[r] : 0.f;
                if (nnz == 0) {
                    for (int64_t u = 0; u < L; u++) {
                        const float v = b + (rs ? rs[u] : 0.f);
                        o[u] = relu && v < 0 ? 0.f : v;
                    }
                    continue;
                }
                row_axpy(o, in + i * in_row, offs + k0, vals + k0, nnz, L, b, rs, relu);
            }
        }
    }
}

/* As er_spmm (without bands), for layers with many active weights per row: the input planes are split into ncb blocks of
 * consecutive planes and, for one 128-float column tile, every output row accumulates one block's part before
 * the next block is read, so a block's tile stays near the core while all output rows use it (measured single
 * threaded: 0.73-0.87x of er_spmm's time from ~14 weights per row and block on). The weights of row r that read
 * planes of block cb are [bptr[r*ncb + cb], bptr[r*ncb + cb + 1]). Tiles narrower than 128 floats read whole
 * input vectors into the slack past `in` (see er_spmm) and load and store only their own output floats. */
void er_spmm_blocked(int64_t nrows, int64_t ncb, const int64_t *bptr, const int32_t *offs, const float *vals,
                     const float *in, int64_t in_row, float *out, int64_t out_plane, int64_t out_row, int64_t n_i,
                     int64_t L, const float *bias, const float *res, int64_t res_plane, int64_t res_row, int relu,
                     int nthreads) {
    const int fused = res != NULL || relu;
    const int64_t T = 8 * VL, ntiles = (L + T - 1) / T;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t i = 0; i < n_i; i++) {
        for (int64_t t = 0; t < ntiles; t++) {
            const int64_t u = t * T, len = L - u < T ? L - u : T;
            const float *base = in + i * in_row + u;
            for (int64_t cb = 0; cb < ncb; cb++) {
                for (int64_t r = 0; r < nrows; r++) {
                    const int64_t k0 = bptr[r * ncb + cb], k1 = bptr[r * ncb + cb + 1];
                    const int last = cb == ncb - 1; /* the epilogue goes with the last block's pass */
                    if (k0 == k1 && cb > 0 && !(fused && last)) continue;
                    float *o = out + r * out_plane + i * out_row + u;
                    const float *rs = res && last ? res + r * res_plane + i * res_row + u : NULL;
                    const int rl = relu && last;
                    const vf bv = (vf){0} + (bias ? bias[r] : 0.f);
                    if (len == T) {
                        vf a[8];
                        for (int j = 0; j < 8; j++) a[j] = cb == 0 ? bv : ld(o + j * VL);
                        tile8(a, base, offs, vals, k0, k1);
                        for (int j = 0; j < 8; j++) st(o + j * VL, epi(a[j], rs ? rs + j * VL : NULL, rl));
                        continue;
                    }
                    const int64_t nv = (len + VL - 1) / VL;
                    vf a[8];
                    for (int64_t j = 0; j < nv; j++) {
                        const int64_t n = len - j * VL < VL ? len - j * VL : VL;
                        a[j] = bv;
                        if (cb > 0) {
                            a[j] = (vf){0};
                            memcpy(&a[j], o + j * VL, (size_t)n * sizeof(float));
                        }
                    }
                    for (int64_t k = k0; k < k1; k++) {
                        const float *p = base + offs[k];
                        const float x = vals[k];
                        for (int64_t j = 0; j < nv; j++) a[j] += x * ld(p + j * VL);
                    }
                    for (int64_t j = 0; j < nv; j++) {
                        const int64_t n = len - j * VL < VL ? len - j * VL : VL;
                        const vf v = epi_part(a[j], rs ? rs + j * VL : NULL, n, rl);
                        memcpy(o + j * VL, &v, (size_t)n * sizeof(float));
                    }
                }
            }
        }
    }
}

/* As er_spmm for a layer whose rows all read the same K offsets (a fully dense layer: vals is the row-major
 * OC x K weight): blocks of 6 rows x 64 floats keep 24 accumulators in registers, so each input vector loaded
 * feeds 6 FMAs instead of 1. Rows past the last full block and span tails past the last 64 floats go through
 * row_axpy (reading into the input's slack as er_spmm does). Work is split over (output row i, span tile, row
 * block), row blocks innermost: a thread's consecutive blocks reuse one input tile from L1/L2. */
void er_dense_rows(int64_t nrows, int64_t K, const int32_t *offs, const float *vals, const float *in,
                   int64_t in_row, float *out, int64_t out_plane, int64_t out_row, int64_t n_i, int64_t L,
                   const float *bias, const float *res, int64_t res_plane, int64_t res_row, int relu,
                   int nthreads) {
    enum { R = 6, T = 4 * VL };
    const int64_t nrb = nrows / R, ntiles = L / T, tail = L - ntiles * T;
    /* work items: (i, tile, row block) full blocks, then (i, row) for what they leave (tail rows, span tail) */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for collapse(3) schedule(static)
        for (int64_t i = 0; i < n_i; i++) {
            for (int64_t t = 0; t < ntiles; t++) {
                for (int64_t rb = 0; rb < nrb; rb++) {
                    const float *base = in + i * in_row + t * T;
                    const float *w = vals + rb * R * K;
                    vf a[R][4];
                    for (int r = 0; r < R; r++) {
                        const vf bv = (vf){0} + (bias ? bias[rb * R + r] : 0.f);
                        a[r][0] = bv, a[r][1] = bv, a[r][2] = bv, a[r][3] = bv;
                    }
                    for (int64_t k = 0; k < K; k++) {
                        const float *p = base + offs[k];
                        const vf x0 = ld(p), x1 = ld(p + VL), x2 = ld(p + 2 * VL), x3 = ld(p + 3 * VL);
#pragma GCC unroll 6
                        for (int r = 0; r < R; r++) {
                            const float c = w[r * K + k];
                            a[r][0] += c * x0;
                            a[r][1] += c * x1;
                            a[r][2] += c * x2;
                            a[r][3] += c * x3;
                        }
                    }
                    for (int r = 0; r < R; r++) {
                        const int64_t row = rb * R + r;
                        float *o = out + row * out_plane + i * out_row + t * T;
                        const float *rs = res ? res + row * res_plane + i * res_row + t * T : NULL;
                        for (int j = 0; j < 4; j++) st(o + j * VL, epi(a[r][j], rs ? rs + j * VL : NULL, relu));
                    }
                }
            }
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t i = 0; i < n_i; i++) {
            for (int64_t row = 0; row < nrows; row++) {
                const int64_t u = row < nrb * R ? ntiles * T : 0, len = row < nrb * R ? tail : L;
                if (len == 0) continue;
                const float *rs = res ? res + row * res_plane + i * res_row + u : NULL;
                row_axpy(out + row * out_plane + i * out_row + u, in + i * in_row + u, offs, vals + row * K, K,
                         len, bias ? bias[row] : 0.f, rs, relu);
            }
        }
    }
}

/* The input gradient of a linear layer (1x1 planes, spans of L floats) in the forward order of its weights:
 * gx[offs[k] + u] += vals[k] * dy[r*dy_row + u] for k in row r, each thread into its own copy (gx itself for
 * thread 0, `part` for the others, `size` floats each), summed at the end: meant for copies that fit in L2, where
 * it saves the gather of the values into input order and the transposed index. With x and dst given, the weight
 * gradient in the same pass (each row's index, values and output gradient read once for both):
 * dst[didx[k]] = sum_u dy[r*dy_row + u] * x[offs[k] + u], the row's lines of dst requested before its dot
 * products run. */
void er_spmm_scatter(int64_t nrows, const int64_t *row_ptr, const int32_t *offs, const float *vals, const float *dy,
                     int64_t dy_row, int64_t L, float *gx, float *part, int64_t size, const float *x, float *dst,
                     const int32_t *didx, int nthreads) {
    int64_t widest = 1;
    if (dst)
        for (int64_t r = 0; r < nrows; r++)
            if (row_ptr[r + 1] - row_ptr[r] > widest) widest = row_ptr[r + 1] - row_ptr[r];
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *acc = t == 0 ? gx : part + (size_t)(t - 1) * (size_t)size;
        float *g = dst ? (float *)malloc((size_t)widest * sizeof(float)) : NULL;
        memset(acc, 0, (size_t)size * sizeof(float));
#pragma omp barrier
#pragma omp for schedule(dynamic, 16)
        for (int64_t r = 0; r < nrows; r++) {
            const int64_t k0 = row_ptr[r], k1 = row_ptr[r + 1];
            const float *d = dy + r * dy_row;
            if (dst && k1 > k0) {
                for (int64_t j = k0; j < k1; j++) __builtin_prefetch(dst + didx[j], 1, 3);
                row_dots(g, d, 0, x, 0, offs + k0, k1 - k0, 1, L);
            }
            int64_t u = 0;
            for (; u + 2 * VL <= L; u += 2 * VL) {
                const vf d0 = ld(d + u), d1 = ld(d + u + VL);
                for (int64_t k = k0; k < k1; k++) {
                    float *q = acc + offs[k] + u;
                    const float w = vals[k];
                    st(q, ld(q) + w * d0);
                    st(q + VL, ld(q + VL) + w * d1);
                }
            }
            for (; u < L; u++)
                for (int64_t k = k0; k < k1; k++) acc[offs[k] + u] += vals[k] * d[u];
            if (dst)
                for (int64_t k = k0; k < k1; k++) dst[didx[k]] = g[k - k0];
        }
        free(g);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < size; i++) {
            float sum = gx[i];
            for (int j = 1; j < nt; j++) sum += part[(size_t)(j - 1) * (size_t)size + i];
            gx[i] = sum;
        }
    }
}

/* The weight gradient at the active weights: for k in row r,
 *     g_k = sum_{i < n_i, u < L} dy[r*dy_plane + i*dy_row + u] * x[offs[k] + i*x_row + u],
 * written to dst[didx[k]] (straight into a dense gradient of the weight's shape), or to dst[k] when didx is NULL.
 * Bands of rows run one after another and the rows of a band are split over the threads, so every row belongs to
 * one thread at a time: no per-thread copies of the result and no reduction (the first band stores, the others
 * add). With one band, a row's lines of the dense gradient are requested before its dot products run, so that
 * they arrive meanwhile (4096x4096 at density 0.01, 2 threads: 1.72 -> 1.40 ms; 0.1: 6.6 -> 5.8 ms). */
void er_sddmm(int64_t nrows, const int64_t *row_ptr, const int32_t *offs, const float *dy, int64_t dy_plane,
              int64_t dy_row, const float *x, int64_t x_row, int64_t n_i, int64_t L, int64_t band, float *dst,
              const int32_t *didx, int nthreads) {
    if (band < 1) band = 1;
    const int64_t nb = (n_i + band - 1) / band;
    int64_t widest = 1;
    for (int64_t r = 0; r < nrows; r++)
        if (row_ptr[r + 1] - row_ptr[r] > widest) widest = row_ptr[r + 1] - row_ptr[r];
#pragma omp parallel num_threads(nthreads)
    {
        float *acc = (float *)malloc((size_t)widest * sizeof(float));
        for (int64_t b = 0; b < nb; b++) {
            const int64_t i0 = b * band, i1 = (b + 1) * band < n_i ? (b + 1) * band : n_i;
#pragma omp for schedule(dynamic, 4)
            for (int64_t r = 0; r < nrows; r++) {
                const int64_t k0 = row_ptr[r], nnz = row_ptr[r + 1] - k0;
                if (nnz == 0) continue;
                if (didx && nb == 1)
                    for (int64_t j = k0; j < k0 + nnz; j++) __builtin_prefetch(dst + didx[j], 1, 3);
                row_dots(acc, dy + r * dy_plane + i0 * dy_row, dy_row, x + i0 * x_row, x_row, offs + k0, nnz,
                         i1 - i0, L);
                if (didx) {
                    const int32_t *d = didx + k0;
                    if (b == 0)
                        for (int64_t j = 0; j < nnz; j++) dst[d[j]] = acc[j];
                    else
                        for (int64_t j = 0; j < nnz; j++) dst[d[j]] += acc[j];
                } else {
                    float *d = dst + k0;
                    if (b == 0)
                        memcpy(d, acc, (size_t)nnz * sizeof(float));
                    else
                        for (int64_t j = 0; j < nnz; j++) d[j] += acc[j];
                }
            }
        }
        free(acc);
    }
}

/* One butterfly stage: rows i and i + s (i without bit s) exchange their s-lane halves through lo / hi. */
static inline void butterfly(vf r[16], int s, vi lo, vi hi) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        if (i & s) continue;
        const vf a = r[i], b = r[i + s];
        r[i] = __builtin_shuffle(a, b, lo);
        r[i + s] = __builtin_shuffle(a, b, hi);
    }
}

/* In-register transpose of a 16x16 block: r[i][l] -> r[l][i] (four butterfly stages of two-vector shuffles). */
static inline void transpose16(vf r[16]) {
    butterfly(r, 8, (vi){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
              (vi){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
    butterfly(r, 4, (vi){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
              (vi){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
    butterfly(r, 2, (vi){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
              (vi){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
    butterfly(r, 1, (vi){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
              (vi){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}

/* dst[c*d_ld + r] = src[r*s_ld + c] (+ bias[r] when given) for r < nr, c < nc: a blocked transpose in 16x16
 * register tiles (the 1x1 maps of a linear layer, where the pixel tables below have nothing to vectorise). */
static void transpose2d(const float *src, int64_t s_ld, float *dst, int64_t d_ld, int64_t nr, int64_t nc,
                        const float *bias, int nthreads) {
    const int64_t rb = (nr + 15) / 16, cb = (nc + 15) / 16;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static) if (nr * nc > 16384)
    for (int64_t i = 0; i < rb; i++) {
        for (int64_t j = 0; j < cb; j++) {
            const int64_t r0 = i * 16, c0 = j * 16;
            if (r0 + 16 <= nr && c0 + 16 <= nc) {
                vf r[16];
                for (int t = 0; t < 16; t++) r[t] = ld(src + (r0 + t) * s_ld + c0);
                transpose16(r);
                const vf bv = bias ? ld(bias + r0) : (vf){0};
                for (int t = 0; t < 16; t++) st(dst + (c0 + t) * d_ld + r0, r[t] + bv);
            } else {
                const int64_t r1 = r0 + 16 < nr ? r0 + 16 : nr, c1 = c0 + 16 < nc ? c0 + 16 : nc;
                for (int64_t c = c0; c < c1; c++)
                    for (int64_t rr = r0; rr < r1; rr++)
                        dst[c * d_ld + rr] = src[rr * s_ld + c] + (bias ? bias[rr] : 0.f);
            }
        }
    }
}

/* Zero the cells of plane row i (phase p) that hold no input pixel; returns the input row h it copies (or -1 when
 * the whole row is padding) and the range [*j0, *j1) of plane columns that hold pixels. */
static int64_t pad_plane_row(float *o, int64_t p, int64_t i, int64_t B, int64_t H, int64_t W, int64_t sh,
                             int64_t sw, int64_t pt, int64_t pl, int64_t Wq, int64_t *j0, int64_t *j1) {
    const int64_t ph = p / sw, pw = p % sw, h = i * sh + ph - pt;
    if (h < 0 || h >= H) {
        memset(o, 0, Wq * B * sizeof(float));
        return -1;
    }
    int64_t a = 0, e = Wq;
    while (a < Wq && a * sw + pw - pl < 0) a++;
    while (e > a && (e - 1) * sw + pw - pl >= W) e--;
    if (a > 0) memset(o, 0, a * B * sizeof(float));
    if (e < Wq) memset(o + e * B, 0, (Wq - e) * B * sizeof(float));
    *j0 = a;
    *j1 = e;
    return h;
}

/* pix[q] = offset of input pixel q = h*W + w inside channel 0's phase planes, or -1 when it lies past them
 * (the caller frees the table). */
static int64_t *phase_pixels(int64_t B, int64_t C, int64_t H, int64_t W, int64_t sh, int64_t sw, int64_t pt,
                             int64_t pl, int64_t Hq, int64_t Wq) {
    const int64_t HW = H * W;
    int64_t *pix = (int64_t *)malloc((size_t)(HW > 0 ? HW : 1) * sizeof(int64_t));
    for (int64_t q = 0; q < HW; q++) {
        const int64_t hp = q / W + pt, wp = q % W + pl, i = hp / sh, j = wp / sw;
        pix[q] = (i < Hq && j < Wq) ? ((((hp % sh) * sw + wp % sw) * C * Hq + i) * Wq + j) * B : -1;
    }
    return pix;
}

/* NCHW x (B, C, H, W) -> phase planes out (sh*sw, C, Hq, Wq, B), zero where the padded input has no pixel:
 * out[ph*sw + pw][c][i][j][b] = x[b][c][i*sh + ph - pt][j*sw + pw - pl]. */
void er_pack(const float *x, float *out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sh, int64_t sw,
             int64_t pt, int64_t pl, int64_t Hq, int64_t Wq, int nthreads) {
    const int64_t P = sh * sw;
    if (H == 1 && W == 1 && P == 1 && Hq == 1 && Wq == 1 && pt == 0 && pl == 0) { /* (B, C) -> (C, B) */
        transpose2d(x, C, out, B, B, C, NULL, nthreads);
        return;
    }
    /* 1. zero every cell without a pixel (padding rows, columns, the margins past the input) */
#pragma omp parallel for collapse(3) num_threads(nthreads) schedule(dynamic, 8)
    for (int64_t p = 0; p < P; p++) {
        for (int64_t c = 0; c < C; c++) {
            for (int64_t i = 0; i < Hq; i++) {
                int64_t j0, j1;
                pad_plane_row(out + ((p * C + c) * Hq + i) * Wq * B, p, i, B, H, W, sh, sw, pt, pl, Wq, &j0, &j1);
            }
        }
    }
    /* 2. every input pixel that lands in the planes. pix[q] = offset of pixel q = h*W + w inside channel 0's
     * planes (-1 when it lies past them); 16 batch rows x 16 pixels are transposed in registers at a time. */
    const int64_t HW = H * W, cstride = Hq * Wq * B;
    int64_t *pix = phase_pixels(B, C, H, W, sh, sw, pt, pl, Hq, Wq);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; c++) {
        float *oc = out + c * cstride;
        for (int64_t b0 = 0; b0 < B; b0 += 16) {
            const int64_t nb = B - b0 < 16 ? B - b0 : 16;
            int64_t q0 = 0;
            if (nb == 16) {
                for (; q0 + 16 <= HW; q0 += 16) {
                    vf r[16];
                    for (int t = 0; t < 16; t++) r[t] = ld(x + ((b0 + t) * C + c) * HW + q0);
                    transpose16(r);
                    for (int t = 0; t < 16; t++)
                        if (pix[q0 + t] >= 0) st(oc + pix[q0 + t] + b0, r[t]);
                }
            }
            for (int64_t q = q0; q < HW; q++) {
                if (pix[q] < 0) continue;
                float *o = oc + pix[q] + b0;
                for (int64_t t = 0; t < nb; t++) o[t] = x[((b0 + t) * C + c) * HW + q];
            }
        }
    }
    free(pix);
}

/* As er_pack for a batch-last input x (C, H, W, B) contiguous (a (B, C, H, W) tensor whose batch stride is 1,
 * as the batch-last outputs of er_spmm are, or any contiguous batch of one): plane rows are copies of input
 * rows, no transposes. */
void er_pack_bl(const float *x, float *out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sh, int64_t sw,
                int64_t pt, int64_t pl, int64_t Hq, int64_t Wq, int nthreads) {
    const int64_t P = sh * sw;
#pragma omp parallel for collapse(3) num_threads(nthreads) schedule(dynamic, 8)
    for (int64_t p = 0; p < P; p++) {
        for (int64_t c = 0; c < C; c++) {
            for (int64_t i = 0; i < Hq; i++) {
                const int64_t pw = p % sw;
                float *o = out + ((p * C + c) * Hq + i) * Wq * B;
                int64_t j0, j1;
                const int64_t h = pad_plane_row(o, p, i, B, H, W, sh, sw, pt, pl, Wq, &j0, &j1);
                if (h < 0) continue;
                const float *src = x + (c * H + h) * W * B;
                if (sw == 1) {
                    if (j1 > j0) memcpy(o + j0 * B, src + (j0 + pw - pl) * B, (j1 - j0) * B * sizeof(float));
                } else if (B == 1) {
                    for (int64_t j = j0; j < j1; j++) o[j] = src[j * sw + pw - pl];
                } else {
                    for (int64_t j = j0; j < j1; j++) memcpy(o + j * B, src + (j * sw + pw - pl) * B, B * sizeof(float));
                }
            }
        }
    }
}

/* Max pooling of a batch-last x (C, H, W, B) with a kh x kw window and stride (kh, kw), no padding:
 * out[c][i][j][b] = max over the window of x[c][i*kh + a][j*kw + e][b], NaN when any element of it is NaN
 * (as torch's max_pool2d). out is (C, OH, OW, B) with OH = H / kh, OW = W / kw (floor). */
void er_maxpool_bl(const float *x, float *out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                   int nthreads) {
    const int64_t OH = H / kh, OW = W / kw;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        for (int64_t i = 0; i < OH; i++) {
            for (int64_t j = 0; j < OW; j++) {
                float *o = out + ((c * OH + i) * OW + j) * B;
                const float *src = x + ((c * H + i * kh) * W + j * kw) * B;
                int64_t u = 0;
                for (; u + VL <= B; u += VL) {
                    vf m = ld(src + u);
                    for (int64_t a = 0; a < kh; a++)
                        for (int64_t e = 0; e < kw; e++) {
                            const vf v = ld(src + (a * W + e) * B + u);
                            const vi take = (v > m) | (v != v);
                            m = (vf)(((vi)v & take) | ((vi)m & ~take));
                        }
                    st(o + u, m);
                }
                for (; u < B; u++) {
                    float m = src[u];
                    for (int64_t a = 0; a < kh; a++)
                        for (int64_t e = 0; e < kw; e++) {
                            const float v = src[(a * W + e) * B + u];
                            if (v > m || v != v) m = v;
                        }
                    o[u] = m;
                }
            }
        }
    }
}

/* 1 when every cell of the planes x (C, Hq, Wq, B) outside rows [pt, Hq - pb) x columns [pl, Wq - pr) is zero:
 * a batch-last result written into zero-bordered planes can then be read in place as the next layer's packed
 * input. */
int er_border_zero(const float *x, int64_t C, int64_t Hq, int64_t Wq, int64_t B, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
    const int64_t row = Wq * B;
    uint32_t bits = 0; /* OR of every border value's magnitude bits: branch-free, vectorised */
    for (int64_t c = 0; c < C; c++) {
        const uint32_t *p = (const uint32_t *)(x + c * Hq * row);
        for (int64_t i = 0; i < Hq; i++) {
            const uint32_t *r = p + i * row;
            if (i < pt || i >= Hq - pb) {
                for (int64_t u = 0; u < row; u++) bits |= r[u];
                continue;
            }
            for (int64_t u = 0; u < pl * B; u++) bits |= r[u];
            for (int64_t u = (Wq - pr) * B; u < row; u++) bits |= r[u];
        }
        if (bits & 0x7fffffffu) return 0;
    }
    return 1;
}

/* y (OC, OH, *, B) with row stride y_row (>= OW*B) -> out (B, OC, OH, OW), plus bias[oc] when given. */
void er_unpack_out(const float *y, const float *bias, float *out, int64_t B, int64_t OC, int64_t OH, int64_t OW,
                   int64_t y_row, int nthreads) {
    const int64_t HW = OH * OW;
    if (HW == 1) { /* (OC, B) -> (B, OC) */
        transpose2d(y, y_row, out, OC, OC, B, bias, nthreads);
        return;
    }
    int64_t *pix = (int64_t *)malloc((size_t)(HW > 0 ? HW : 1) * sizeof(int64_t));
    for (int64_t q = 0; q < HW; q++) pix[q] = (q / OW) * y_row + (q % OW) * B;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t oc = 0; oc < OC; oc++) {
        const float *src = y + oc * OH * y_row;
        const float bv = bias ? bias[oc] : 0.f;
        for (int64_t b0 = 0; b0 < B; b0 += 16) {
            const int64_t nb = B - b0 < 16 ? B - b0 : 16;
            int64_t q0 = 0;
            if (nb == 16) {
                for (; q0 + 16 <= HW; q0 += 16) {
                    vf r[16];
                    for (int t = 0; t < 16; t++) r[t] = ld(src + pix[q0 + t] + b0);
                    transpose16(r);
                    for (int t = 0; t < 16; t++) st(out + ((b0 + t) * OC + oc) * HW + q0, r[t] + bv);
                }
            }
            for (int64_t t = 0; t < nb; t++) {
                float *o = out + ((b0 + t) * OC + oc) * HW;
                for (int64_t q = q0; q < HW; q++) o[q] = src[pix[q] + b0 + t] + bv;
            }
        }
    }
    free(pix);
}

/* Adjoint of er_pack: dx[b][c][h][w] = g[ph*sw + pw][c][i][j][b] for the phase plane pixel of (h, w), or 0 when
 * that pixel lies outside the planes (it never reached an output). */
void er_unpack_grad(const float *g, float *dx, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sh, int64_t sw,
                    int64_t pt, int64_t pl, int64_t Hq, int64_t Wq, int nthreads) {
    const int64_t HW = H * W, cstride = Hq * Wq * B;
    if (H == 1 && W == 1 && sh * sw == 1 && Hq == 1 && Wq == 1 && pt == 0 && pl == 0) { /* (C, B) -> (B, C) */
        transpose2d(g, B, dx, C, C, B, NULL, nthreads);
        return;
    }
    int64_t *pix = phase_pixels(B, C, H, W, sh, sw, pt, pl, Hq, Wq);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; c++) {
        const float *gc = g + c * cstride;
        for (int64_t b0 = 0; b0 < B; b0 += 16) {
            const int64_t nb = B - b0 < 16 ? B - b0 : 16;
            int64_t q0 = 0;
            if (nb == 16) {
                for (; q0 + 16 <= HW; q0 += 16) {
                    vf r[16];
                    for (int t = 0; t < 16; t++) {
                        const vf zero = {0};
                        r[t] = pix[q0 + t] >= 0 ? ld(gc + pix[q0 + t] + b0) : zero;
                    }
                    transpose16(r);
                    for (int t = 0; t < 16; t++) st(dx + ((b0 + t) * C + c) * HW + q0, r[t]);
                }
            }
            for (int64_t t = 0; t < nb; t++) {
                float *o = dx + ((b0 + t) * C + c) * HW;
                for (int64_t q = q0; q < HW; q++) o[q] = pix[q] >= 0 ? gc[pix[q] + b0 + t] : 0.f;
            }
        }
    }
    free(pix);
}

/* As er_unpack_grad, into a batch-last dx (C, H, W, B): dx[c][h][w][b] = g[ph*sw + pw][c][i][j][b] (or 0), rows of
 * B floats copied, no transposes (the input gradient of a layer whose input was batch-last). */
void er_unpack_grad_bl(const float *g, float *dx, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pl, int64_t Hq, int64_t Wq, int nthreads) {
    const int64_t HW = H * W, cstride = Hq * Wq * B;
    int64_t *pix = phase_pixels(B, C, H, W, sh, sw, pt, pl, Hq, Wq);
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        for (int64_t h = 0; h < H; h++) {
            const float *gc = g + c * cstride;
            float *o = dx + (c * H + h) * W * B;
            const int64_t *ph = pix + h * W;
            if (sw == 1 && W > 0 && ph[0] >= 0 && ph[W - 1] == ph[0] + (W - 1) * B) { /* one run of the plane row */
                memcpy(o, gc + ph[0], W * B * sizeof(float));
                continue;
            }
            for (int64_t w = 0; w < W; w++) {
                if (ph[w] >= 0)
                    memcpy(o + w * B, gc + ph[w], B * sizeof(float));
                else
                    memset(o + w * B, 0, B * sizeof(float));
            }
        }
    }
    free(pix);
}

/* Batch normalisation in training mode over the rows x[c] of N contiguous floats (the channel blocks of a
 * batch-last tensor): per row the mean and the biased variance (two passes while the row sits in L2, partial
 * sums of 1024 floats in vectors, added up in double), then y = x * scale + shift with scale = w * invstd and
 * shift = b - mean * scale (w, b NULL: 1, 0). Writes mean[c] and invstd[c]; with running statistics (rm, rv not
 * NULL) also rm = (1 - f) rm + f mean and rv = (1 - f) rv + f var N / (N - 1), as torch's batch_norm. */
void er_bn_train(const float *x, float *y, int64_t C, int64_t N, const float *w, const float *b, double eps,
                 double f, float *rm, float *rv, float *mean, float *invstd, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; c++) {
        const float *xc = x + c * N;
        float *yc = y + c * N;
        double sum = 0.0;
        int64_t u = 0;
        for (; u + 1024 <= N; u += 1024) {
            vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (int64_t k = u; k < u + 1024; k += 4 * VL) {
                s0 += ld(xc + k), s1 += ld(xc + k + VL), s2 += ld(xc + k + 2 * VL), s3 += ld(xc + k + 3 * VL);
            }
            sum += hsum((s0 + s1) + (s2 + s3));
        }
        for (; u < N; u++) sum += xc[u];
        const double m = sum / (double)N;
        const float mf = (float)m;
        double sq = 0.0;
        u = 0;
        for (; u + 1024 <= N; u += 1024) {
            vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (int64_t k = u; k < u + 1024; k += 4 * VL) {
                const vf d0 = ld(xc + k) - mf, d1 = ld(xc + k + VL) - mf;
                const vf d2 = ld(xc + k + 2 * VL) - mf, d3 = ld(xc + k + 3 * VL) - mf;
                s0 += d0 * d0, s1 += d1 * d1, s2 += d2 * d2, s3 += d3 * d3;
            }
            sq += hsum((s0 + s1) + (s2 + s3));
        }
        for (; u < N; u++) {
            const double d = (double)xc[u] - m;
            sq += d * d;
        }
        const double var = sq / (double)N, inv = 1.0 / __builtin_sqrt(var + eps);
        const double sc = (w ? (double)w[c] : 1.0) * inv, sh = (b ? (double)b[c] : 0.0) - m * sc;
        const float scf = (float)sc, shf = (float)sh;
        u = 0;
        for (; u + VL <= N; u += VL) st(yc + u, ld(xc + u) * scf + shf);
        for (; u < N; u++) yc[u] = xc[u] * scf + shf;
        mean[c] = mf;
        invstd[c] = (float)inv;
        if (rm && rv) {
            rm[c] = (float)((1.0 - f) * (double)rm[c] + f * m);
            rv[c] = (float)((1.0 - f) * (double)rv[c] + f * var * (double)N / (double)(N - 1));
        }
    }
}

/* Gradient of er_maxpool_bl: dx (C, H, W, B) = g (C, OH, OW, B) at the element each window's maximum came from
 * (the first maximum in row-major window order, the last NaN, as torch's max_pool2d picks), 0 elsewhere
 * (rows and columns past OH*kh, OW*kw included). */
void er_maxpool_bl_grad(const float *x, const float *g, float *dx, int64_t B, int64_t C, int64_t H, int64_t W,
                        int64_t kh, int64_t kw, int nthreads) {
    const int64_t OH = H / kh, OW = W / kw, K = kh * kw;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        for (int64_t i = 0; i < OH; i++) {
            for (int64_t a = 0; a < kh; a++) { /* columns no window covers */
                float *row = dx + ((c * H + i * kh + a) * W) * B;
                if (OW * kw < W) memset(row + OW * kw * B, 0, (W - OW * kw) * B * sizeof(float));
            }
            for (int64_t j = 0; j < OW; j++) {
                const int64_t base = ((c * H + i * kh) * W + j * kw) * B;
                const float *src = x + base, *gr = g + ((c * OH + i) * OW + j) * B;
                float *dst = dx + base;
                int64_t u = 0;
                for (; u + VL <= B; u += VL) {
                    vf m = ld(src + u);
                    vi idx = {0};
                    for (int64_t k = 0; k < K; k++) {
                        const vf v = ld(src + ((k / kw) * W + k % kw) * B + u);
                        const vi take = (v > m) | (v != v);
                        m = (vf)(((vi)v & take) | ((vi)m & ~take));
                        idx = (idx & ~take) | ((vi){0} + (int32_t)k & take);
                    }
                    const vf gv = ld(gr + u);
                    for (int64_t k = 0; k < K; k++) {
                        const vi hit = idx == (int32_t)k;
                        st(dst + ((k / kw) * W + k % kw) * B + u, (vf)((vi)gv & hit));
                    }
                }
                for (; u < B; u++) {
                    float m = src[u];
                    int64_t best = 0;
                    for (int64_t k = 0; k < K; k++) {
                        const float v = src[((k / kw) * W + k % kw) * B + u];
                        if (v > m || v != v) m = v, best = k;
                    }
                    for (int64_t k = 0; k < K; k++) dst[((k / kw) * W + k % kw) * B + u] = k == best ? gr[u] : 0.f;
                }
            }
        }
    }
    /* rows no window covers */
    if (OH * kh < H) {
        for (int64_t c = 0; c < C; c++)
            memset(dx + (c * H + OH * kh) * W * B, 0, (H - OH * kh) * W * B * sizeof(float));
    }
}
