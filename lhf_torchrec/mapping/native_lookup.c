/* The apply of a perfect hash mapping (every slot layout), AVX-512, for CPU.
 *
 * The same function as lhf_torchrec.mapping: perfect_hash.lookup / lookup_records / lookup_remainders for the
 * rows of ids with an entry, hashing.hash_with_coefficients (plus the hash region's first row) for every other id;
 * bit for bit, which the tests check against the torch ops. It is built and loaded by native.py.
 *
 * Why a kernel: in torch ops (eager or compiled by inductor) the lookup of a table that outgrows the caches
 * is a chain of dependent random reads per id (pilot, then slot) between ~40 scalar 64-bit integer ops, and
 * its 1e6-entry tables cost 3.3-3.9x a plain gather (docs/performance.md). Here blocks of ids go through
 * three stages as a pipeline (mix and group, then slot, then read and compare), eight ids at a time in
 * AVX-512, each stage prefetching what the next one reads: while one block's slots are read, the next
 * block's slots and the pilots of the one after are on their way from memory.
 *
 * All arithmetic is on 64-bit words, wrapping like torch's int64 ops; logical shifts stand for torch's
 * arithmetic shift followed by a mask, and an arithmetic shift (srai) where torch compares a shifted record.
 */
#include <immintrin.h>
#include <stdint.h>

#define MERSENNE_31 2147483647LL
/* Ids per block of the pipeline (lhf_perfect_hash_rows): a block's slots and the next block's pilots are in
 * flight while one is read. 32 (to 48) was the fastest of 16-1,024 on a 1e6-entry table read from cold caches
 * (AMD EPYC, Zen 4; 1e6 lookups of 635k distinct ids, as in docs/performance.md): 2.4-2.5x a plain gather,
 * 2.6-2.8x at 64, 2.9-3.3x at 128-256, 4.2x at 16; without the pipeline (a block's slots computed, prefetched,
 * then read) 2.7-2.8x. With larger blocks prefetched lines leave L1 before their block is read. */
#define BLOCK 32

enum { LAYOUT_RECORDS = 0, LAYOUT_REMAINDERS = 1, LAYOUT_SPLIT = 2 };

static inline __m512i mix64(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                           _mm512_set1_epi64((int64_t)0xBF58476D1CE4E5B9ULL));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                           _mm512_set1_epi64((int64_t)0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

/* floor(top32(product) * n / 2^32) for n < 2^32 (perfect_hash._slot_of). */
static inline __m512i scale_top32(__m512i product, __m512i n) {
    return _mm512_srli_epi64(_mm512_mul_epu32(_mm512_srli_epi64(product, 32), n), 32);
}

/* hashing.hash_with_coefficients; c = (num_buckets, a0, a1, a2, b), every factor below 2^31. */
static inline __m512i carter_wegman(__m512i x, const int64_t *c) {
    const __m512i p = _mm512_set1_epi64(MERSENNE_31);
    __m512i t0 = _mm512_mul_epu32(_mm512_and_si512(x, p), _mm512_set1_epi64(c[1]));
    __m512i t1 = _mm512_mul_epu32(_mm512_and_si512(_mm512_srli_epi64(x, 31), p), _mm512_set1_epi64(c[2]));
    __m512i h = _mm512_add_epi64(_mm512_and_si512(t0, p), _mm512_srli_epi64(t0, 31));
    h = _mm512_add_epi64(h, _mm512_add_epi64(_mm512_and_si512(t1, p), _mm512_srli_epi64(t1, 31)));
    h = _mm512_add_epi64(h, _mm512_mul_epu32(_mm512_srli_epi64(x, 62), _mm512_set1_epi64(c[3])));
    h = _mm512_add_epi64(h, _mm512_set1_epi64(c[4]));
    h = _mm512_add_epi64(_mm512_and_si512(h, p), _mm512_srli_epi64(h, 31));
    h = _mm512_and_si512(_mm512_add_epi64(_mm512_srli_epi64(_mm512_add_epi64(h, _mm512_set1_epi64(1)), 31), h), p);
    return _mm512_srli_epi64(_mm512_mul_epu32(h, _mm512_set1_epi64(c[0])), 31);
}

/* Elements of 1 or 2 bytes (sign-extended to int64) of an array of count, at the lanes of index. The gather
 * reads 4 bytes per lane: lanes whose 4 bytes would pass the array's end are read one by one. */
static inline __m512i gather_narrow(const void *base, __m512i index, int64_t bytes, int64_t count, __mmask8 lanes) {
    const __mmask8 safe = lanes & _mm512_cmplt_epi64_mask(index, _mm512_set1_epi64(count - 4 / bytes + 1));
    __m256i words = bytes == 1 ? _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), safe, index, base, 1)
                               : _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), safe, index, base, 2);
    if (safe != lanes) {
        int64_t at[8];
        int32_t value[8];
        _mm512_storeu_si512(at, index);
        _mm256_storeu_si256((__m256i *)value, words);
        for (int lane = 0; lane < 8; lane++)
            if ((lanes & ~safe) >> lane & 1)
                value[lane] = bytes == 1 ? ((const int8_t *)base)[at[lane]] : ((const int16_t *)base)[at[lane]];
        words = _mm256_loadu_si256((const __m256i *)value);
    }
    return bytes == 1 ? _mm512_cvtepi8_epi64(_mm256_cvtepi32_epi8(words))
                      : _mm512_cvtepi16_epi64(_mm256_cvtepi32_epi16(words));
}

static inline __mmask8 lanes_of(int64_t left) { return left >= 8 ? 0xFF : (__mmask8)((1u << left) - 1); }

/* What every stage needs of the table. */
typedef struct {
    int64_t layout, key_bytes, high_bytes, num_slots, num_groups, slot_size;
    const char *slots, *rows_high;
    const int16_t *rows_low, *pilots;
    const int64_t *coefficients;
    __m128i shift;
    __m512i low_mask, groups, strips, slot_count, w0, w1, w2, w3, offset, first_row;
} Table;

/* Stage 1 of a block: the mixed keys and their groups; prefetches the groups' pilots. */
static inline void mix_and_group(const Table *t, const int64_t *ids, int64_t size, int64_t *mixed, int64_t *index) {
    for (int64_t j = 0; j < size; j += 8) {
        const __mmask8 lanes = lanes_of(size - j);
        __m512i key = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(lanes, ids + j), t->offset);
        __m512i mix = mix64(_mm512_add_epi64(key, t->w1));
        __m512i group = t->layout == LAYOUT_REMAINDERS ? scale_top32(mix, t->groups)
                                                       : scale_top32(_mm512_mullo_epi64(mix, t->w0), t->groups);
        _mm512_store_si512(mixed + j, mix);
        _mm512_store_si512(index + j, group);
    }
    for (int64_t j = 0; j < size; j++) _mm_prefetch((const char *)(t->pilots + index[j]), _MM_HINT_T0);
}

/* Stage 2: the slots from the pilots (in place of the groups); prefetches the slots. */
static inline void place(const Table *t, int64_t size, const int64_t *mixed, int64_t *index) {
    for (int64_t j = 0; j < size; j += 8) {
        const __mmask8 lanes = lanes_of(size - j);
        __m512i mix = _mm512_load_si512(mixed + j);
        __m512i pilot = gather_narrow(t->pilots, _mm512_load_si512(index + j), 2, t->num_groups, lanes);
        __m512i slot;
        if (t->layout == LAYOUT_REMAINDERS) {
            __m512i x = _mm512_xor_si512(_mm512_mullo_epi64(pilot, t->w2), mix);
            __m512i strip = scale_top32(_mm512_mullo_epi64(x, t->w0), t->strips);
            slot = _mm512_or_si512(_mm512_sll_epi64(strip, t->shift), _mm512_and_si512(x, t->low_mask));
        } else {
            __m512i multiplier = _mm512_add_epi64(_mm512_mullo_epi64(pilot, t->w3), t->w2);
            slot = scale_top32(_mm512_mullo_epi64(multiplier, mix), t->slot_count);
        }
        _mm512_store_si512(index + j, slot);
    }
    for (int64_t j = 0; j < size; j++) {
        _mm_prefetch(t->slots + index[j] * t->slot_size, _MM_HINT_T0);
        if (t->layout == LAYOUT_SPLIT) {
            _mm_prefetch((const char *)(t->rows_low + index[j]), _MM_HINT_T0);
            if (t->high_bytes) _mm_prefetch(t->rows_high + index[j] * t->high_bytes, _MM_HINT_T0);
        }
    }
}

/* Stage 3: the slots read and compared, the misses hashed, the rows written. */
static inline void finish(const Table *t, const int64_t *ids, int64_t size, const int64_t *mixed, const int64_t *index,
                          int64_t *out) {
    for (int64_t j = 0; j < size; j += 8) {
        const __mmask8 lanes = lanes_of(size - j);
        const __m512i slot = _mm512_load_si512(index + j);
        __m512i id = _mm512_maskz_loadu_epi64(lanes, ids + j);
        __m512i row;
        __mmask8 found;
        if (t->layout == LAYOUT_SPLIT) {
            __m512i key = _mm512_sub_epi64(id, t->offset);
            __m512i stored = t->key_bytes == 8
                ? _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), lanes, slot, t->slots, 8)
                : _mm512_cvtepi32_epi64(_mm512_mask_i64gather_epi32(_mm256_setzero_si256(), lanes, slot, t->slots, 4));
            found = _mm512_cmpeq_epi64_mask(stored, key);
            row = gather_narrow(t->rows_low, slot, 2, t->num_slots, lanes);
            if (t->high_bytes)
                row = _mm512_or_si512(
                    _mm512_slli_epi64(gather_narrow(t->rows_high, slot, t->high_bytes, t->num_slots, lanes), 16),
                    _mm512_and_si512(row, _mm512_set1_epi64(0xFFFF)));
        } else {
            __m512i record = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), lanes, slot, t->slots, 8);
            row = _mm512_and_si512(record, t->low_mask);
            if (t->layout == LAYOUT_REMAINDERS) {
                __m512i differ = _mm512_xor_si512(record, _mm512_load_si512(mixed + j));
                found = _mm512_cmpeq_epi64_mask(_mm512_srl_epi64(differ, t->shift), _mm512_setzero_si512())
                        & _mm512_cmpneq_epi64_mask(row, t->low_mask);
            } else {
                found = _mm512_cmpeq_epi64_mask(_mm512_sra_epi64(record, t->shift), _mm512_sub_epi64(id, t->offset));
            }
        }
        __m512i hashed = _mm512_add_epi64(t->first_row, carter_wegman(id, t->coefficients));
        _mm512_mask_storeu_epi64(out + j, lanes, _mm512_mask_blend_epi64(found, hashed, row));
    }
}

/* Rows of n ids into out.
 *   layout: LAYOUT_RECORDS (slots: int64 key << low_bits | row, key = id - key_offset), LAYOUT_REMAINDERS
 *           (slots: int64 mixed key above low_bits, row below; the slot from the pilot's xor displacement) or
 *           LAYOUT_SPLIT (slots: keys of key_bytes 4 or 8, rows_low int16, rows_high the bits above of
 *           high_bytes 0, 1 or 2); num_slots < 2^31 slots;
 *   pilots: num_groups int16 (num_groups < 2^32); group_hash: the table's four words;
 *   hash_offset, coefficients: the first row and the hash (num_buckets, a0, a1, a2, b) of ids without an entry.
 * Blocks of ids go through the three stages as a pipeline: while block b is read (stage 3), the slots of
 * block b + 1 (stage 2) and the pilots of block b + 2 (stage 1) are on their way from memory. */
void lhf_perfect_hash_rows(const int64_t *ids, int64_t n, int64_t layout, const void *slots, int64_t key_bytes,
                           const int16_t *rows_low, const void *rows_high, int64_t high_bytes, int64_t num_slots,
                           const int16_t *pilots, int64_t num_groups, const int64_t *group_hash, int64_t low_bits,
                           int64_t key_offset, int64_t hash_offset, const int64_t *coefficients, int64_t *out) {
    int64_t mixed[3][BLOCK] __attribute__((aligned(64))), index[3][BLOCK] __attribute__((aligned(64)));
    const Table t = {
        .layout = layout, .key_bytes = key_bytes, .high_bytes = high_bytes, .num_slots = num_slots,
        .num_groups = num_groups, .slot_size = layout == LAYOUT_SPLIT ? key_bytes : 8,
        .slots = (const char *)slots, .rows_high = (const char *)rows_high, .rows_low = rows_low, .pilots = pilots,
        .coefficients = coefficients, .shift = _mm_cvtsi64_si128(low_bits),
        .low_mask = _mm512_set1_epi64((int64_t)((1ULL << low_bits) - 1)), .groups = _mm512_set1_epi64(num_groups),
        .strips = _mm512_set1_epi64(num_slots >> low_bits), .slot_count = _mm512_set1_epi64(num_slots),
        .w0 = _mm512_set1_epi64(group_hash[0]), .w1 = _mm512_set1_epi64(group_hash[1]),
        .w2 = _mm512_set1_epi64(group_hash[2]), .w3 = _mm512_set1_epi64(group_hash[3]),
        .offset = _mm512_set1_epi64(key_offset), .first_row = _mm512_set1_epi64(hash_offset)};
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    for (int64_t b = 0; b < blocks + 2; b++) {
        if (b < blocks) {
            const int64_t start = b * BLOCK, size = n - start < BLOCK ? n - start : BLOCK;
            mix_and_group(&t, ids + start, size, mixed[b % 3], index[b % 3]);
        }
        if (b >= 1 && b - 1 < blocks) {
            const int64_t start = (b - 1) * BLOCK, size = n - start < BLOCK ? n - start : BLOCK;
            place(&t, size, mixed[(b - 1) % 3], index[(b - 1) % 3]);
        }
        if (b >= 2) {
            const int64_t start = (b - 2) * BLOCK, size = n - start < BLOCK ? n - start : BLOCK;
            finish(&t, ids + start, size, mixed[(b - 2) % 3], index[(b - 2) % 3], out + start);
        }
    }
}
