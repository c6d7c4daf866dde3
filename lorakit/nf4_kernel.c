/* NF4 dequantization on the CPU: the same arithmetic as lorakit.nf4's pure-torch path, in one pass.
 *
 * Compiled on first use by lorakit/native.py with the system's C compiler (no torch headers, no Python
 * API: the caller passes raw pointers) and called through ctypes. Value 2i sits in the high nibble of
 * byte i, value 2i + 1 in the low one; value v belongs to block v / bs and dequantizes to
 * code[nibble] * absmax[block] in float32, so the result is bit for bit the torch path's.
 *
 * Three versions of the inner loop, chosen at run time by what the CPU supports:
 *   avx512: 16 bytes -> 32 floats a step; the block's 16 scaled levels sit in one register and
 *           _mm512_permutexvar_ps looks 16 codes up at once;
 *   avx2:   8 bytes -> 16 floats a step; two 8-entry lookups (_mm256_permutevar8x32_ps), blended on bit 3;
 *   scalar: one byte at a time (any CPU, any compiler).
 * Blocks are split evenly between OpenMP threads when the kernel was built with OpenMP.
 */
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define LORAKIT_X86 1
#include <immintrin.h>
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

/* Every loop below works on whole blocks b0 .. b1 - 1 of an n-value tensor; bs is even, so a block starts
 * on a byte boundary, and only the last value of an odd-length tensor sits alone (in a high nibble). */
#define BLOCK_BOUNDS                                                        \
    const float s = absmax[b];                                              \
    const int64_t start = b * bs, len = n - start < bs ? n - start : bs;    \
    const int64_t nb = len / 2;                                             \
    const uint8_t *d = data + start / 2;                                    \
    float *o = out + start;

#define SCALAR_TAIL                                                         \
    for (; j < nb; j++) {                                                   \
        const uint8_t x = d[j];                                             \
        o[2 * j] = code[x >> 4] * s;                                        \
        o[2 * j + 1] = code[x & 15] * s;                                    \
    }                                                                       \
    if (len & 1) o[len - 1] = code[d[nb] >> 4] * s;

static void blocks_scalar(const uint8_t *data, const float *absmax, const float *code, float *out,
                          int64_t n, int64_t bs, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        BLOCK_BOUNDS
        int64_t j = 0;
        SCALAR_TAIL
    }
}

#ifdef LORAKIT_X86
__attribute__((target("avx2")))
static void blocks_avx2(const uint8_t *data, const float *absmax, const float *code, float *out,
                        int64_t n, int64_t bs, int64_t b0, int64_t b1) {
    const __m256 lo8 = _mm256_loadu_ps(code), hi8 = _mm256_loadu_ps(code + 8);
    const __m256i m15 = _mm256_set1_epi32(15);
    for (int64_t b = b0; b < b1; b++) {
        BLOCK_BOUNDS
        const __m256 sv = _mm256_set1_ps(s);
        const __m256 t_lo = _mm256_mul_ps(lo8, sv), t_hi = _mm256_mul_ps(hi8, sv); /* levels 0-7, 8-15 */
        int64_t j = 0;
        for (; j + 8 <= nb; j += 8) {
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(d + j)));
            const __m256i ih = _mm256_srli_epi32(v, 4), il = _mm256_and_si256(v, m15);
            /* bit 3 of the index, moved to the sign bit, picks the upper half of the table */
            const __m256 h = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, ih), _mm256_permutevar8x32_ps(t_hi, ih),
                                              _mm256_castsi256_ps(_mm256_slli_epi32(ih, 28)));
            const __m256 l = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, il), _mm256_permutevar8x32_ps(t_hi, il),
                                              _mm256_castsi256_ps(_mm256_slli_epi32(il, 28)));
            const __m256 a = _mm256_unpacklo_ps(h, l), c = _mm256_unpackhi_ps(h, l); /* h0 l0 h1 l1 | h4 l4 h5 l5 */
            _mm256_storeu_ps(o + 2 * j, _mm256_permute2f128_ps(a, c, 0x20));
            _mm256_storeu_ps(o + 2 * j + 8, _mm256_permute2f128_ps(a, c, 0x31));
        }
        SCALAR_TAIL
    }
}

__attribute__((target("avx512f")))
static void blocks_avx512(const uint8_t *data, const float *absmax, const float *code, float *out,
                          int64_t n, int64_t bs, int64_t b0, int64_t b1) {
    const __m512 levels = _mm512_loadu_ps(code);
    const __m512i m15 = _mm512_set1_epi32(15);
    /* interleave h (indices 0-15) and l (16-31): h0 l0 h1 l1 ... */
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t b = b0; b < b1; b++) {
        BLOCK_BOUNDS
        const __m512 t = _mm512_mul_ps(levels, _mm512_set1_ps(s));
        int64_t j = 0;
        for (; j + 16 <= nb; j += 16) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(d + j)));
            const __m512 h = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
            const __m512 l = _mm512_permutexvar_ps(_mm512_and_si512(v, m15), t);
            _mm512_storeu_ps(o + 2 * j, _mm512_permutex2var_ps(h, first, l));
            _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutex2var_ps(h, second, l));
        }
        SCALAR_TAIL
    }
}
#endif

/* The best version this CPU runs. */
int lorakit_nf4_best_isa(void) {
#ifdef LORAKIT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2")) return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

int lorakit_nf4_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* out[0 .. n) from data[0 .. ceil(n / 2)) and absmax[0 .. ceil(n / bs)). Returns 0, or -1 for an isa this
 * build or CPU cannot run, -2 for a bad size (nothing written then). */
int lorakit_nf4_dequantize(const uint8_t *data, const float *absmax, const float *code, float *out,
                           int64_t n, int64_t bs, int isa, int nthreads) {
    if (n <= 0 || bs <= 0 || bs % 2) return -2;
    if (isa < ISA_SCALAR || isa > lorakit_nf4_best_isa()) return -1;
    void (*blocks)(const uint8_t *, const float *, const float *, float *, int64_t, int64_t, int64_t, int64_t) =
        blocks_scalar;
#ifdef LORAKIT_X86
    if (isa == ISA_AVX512) blocks = blocks_avx512;
    if (isa == ISA_AVX2) blocks = blocks_avx2;
#endif
    const int64_t nblocks = (n + bs - 1) / bs;
#ifdef _OPENMP
    if (nthreads > 1 && nblocks > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
            blocks(data, absmax, code, out, n, bs, nblocks * t / k, nblocks * (t + 1) / k);
        }
        return 0;
    }
#endif
    (void)nthreads;
    blocks(data, absmax, code, out, n, bs, 0, nblocks);
    return 0;
}
