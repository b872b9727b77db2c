// Gather and scatter of paged KV blocks for the GPU KV transfer (NCCL).
//
// Layout. Per layer, the K cache and the V cache are each a flat array of
// blocks laid out [block][kv_head][slot][head_dim]; one block of one layer is
// one contiguous run of `block_size * n_kv_heads * head_dim` elements (a
// "half block": K or V alone). The wire payload of one layer (see
// kvtransfer/src/wire.rs, a Blocks frame) is, for each block in list order,
// that block's K then its V:
//
//     payload = K[ids[0]] V[ids[0]] K[ids[1]] V[ids[1]] ...
//
// so list entry i, half h (0 = K, 1 = V) lives at payload offset
// (2 * i + h) * half_block. The kernels below only move bits: they never
// interpret the elements, so the f16 cache is handled as 16-bit words and the
// f32 cache works too (as twice as many 16-bit words, or as 16-byte words).
//
// Self-contained on purpose: no #include, so NVRTC compiles this file at run
// time without needing the CUDA headers on the serving machine.
//
// Indexing (all four kernels):
//   gridDim.z == 2         blockIdx.z selects K (0) or V (1).
//   gridDim.y <= 65535     blockIdx.y walks the block list with stride gridDim.y,
//                          so any number of blocks works with a capped grid.
//   gridDim.x, blockDim.x  one grid-stride loop over the words of one half
//                          block: word w = blockIdx.x * blockDim.x + threadIdx.x,
//                          then w += gridDim.x * blockDim.x. Consecutive threads
//                          touch consecutive words: fully coalesced reads and
//                          writes on both sides.
//   The host picks gridDim.x = min(ceil(words / blockDim.x), cap) and
//   blockDim.x = 256.
//
// Block ids are checked on the device against `n_cache_blocks`: an id out of
// range is skipped (its payload range is left untouched on gather, dropped on
// scatter), never an out-of-bounds access. The host validates ids before the
// launch and reports the error; this is the last line of defence.
//
// Scatter with a repeated destination id is a race (which copy lands is
// unspecified): the host rejects duplicates.

typedef unsigned short kv_word16_t;   // one f16 element (bits only)
typedef unsigned int kv_block_id_t;
typedef unsigned long long kv_size_t; // 64-bit offsets: caches can exceed 2^32 words

// Byte-granular copies use this 16-byte word; `uint4` is built into NVRTC.
typedef uint4 kv_word128_t;

// The index arithmetic shared by all kernels. `words` is the size of one half
// block in the kernel's word type. Returns false when the block id is out of
// range.
__device__ __forceinline__ bool kv_block_offsets(
    const kv_block_id_t* __restrict__ block_ids,
    kv_block_id_t i,
    kv_block_id_t n_cache_blocks,
    kv_size_t words,
    kv_size_t* cache_off,
    kv_size_t* buf_off)
{
    const kv_block_id_t id = block_ids[i];
    if (id >= n_cache_blocks) {
        return false;
    }
    *cache_off = (kv_size_t)id * words;
    *buf_off = (2ull * (kv_size_t)i + (kv_size_t)blockIdx.z) * words;
    return true;
}

// One grid-stride pass of one half block: dst[dst_off + w] = src[src_off + w].
template <typename W>
__device__ __forceinline__ void kv_copy_half_block(
    const W* __restrict__ src, kv_size_t src_off,
    W* __restrict__ dst, kv_size_t dst_off,
    kv_size_t words)
{
    const kv_size_t stride = (kv_size_t)gridDim.x * blockDim.x;
    for (kv_size_t w = (kv_size_t)blockIdx.x * blockDim.x + threadIdx.x; w < words; w += stride) {
        dst[dst_off + w] = src[src_off + w];
    }
}

template <typename W>
__device__ __forceinline__ void kv_gather(
    const W* __restrict__ k_cache,
    const W* __restrict__ v_cache,
    const kv_block_id_t* __restrict__ block_ids,
    kv_block_id_t n_blocks,
    kv_block_id_t n_cache_blocks,
    kv_size_t words,
    W* __restrict__ out)
{
    const W* __restrict__ cache = blockIdx.z == 0 ? k_cache : v_cache;
    for (kv_block_id_t i = blockIdx.y; i < n_blocks; i += gridDim.y) {
        kv_size_t cache_off, buf_off;
        if (kv_block_offsets(block_ids, i, n_cache_blocks, words, &cache_off, &buf_off)) {
            kv_copy_half_block<W>(cache, cache_off, out, buf_off, words);
        }
    }
}

template <typename W>
__device__ __forceinline__ void kv_scatter(
    const W* __restrict__ in,
    const kv_block_id_t* __restrict__ block_ids,
    kv_block_id_t n_blocks,
    kv_block_id_t n_cache_blocks,
    kv_size_t words,
    W* __restrict__ k_cache,
    W* __restrict__ v_cache)
{
    W* __restrict__ cache = blockIdx.z == 0 ? k_cache : v_cache;
    for (kv_block_id_t i = blockIdx.y; i < n_blocks; i += gridDim.y) {
        kv_size_t cache_off, buf_off;
        if (kv_block_offsets(block_ids, i, n_cache_blocks, words, &cache_off, &buf_off)) {
            kv_copy_half_block<W>(in, buf_off, cache, cache_off, words);
        }
    }
}

// Copies blocks `block_ids[0..n_blocks)` of one layer's K and V caches into
// `out` in wire payload order (per block: K, then V).
//   k_cache, v_cache: n_cache_blocks * half_block_elems f16 words each.
//   out:              2 * n_blocks * half_block_elems f16 words.
extern "C" __global__ void gather_kv_blocks(
    const kv_word16_t* __restrict__ k_cache,
    const kv_word16_t* __restrict__ v_cache,
    const kv_block_id_t* __restrict__ block_ids,
    kv_block_id_t n_blocks,
    kv_block_id_t n_cache_blocks,
    kv_size_t half_block_elems,
    kv_word16_t* __restrict__ out)
{
    kv_gather<kv_word16_t>(k_cache, v_cache, block_ids, n_blocks, n_cache_blocks, half_block_elems, out);
}

// The inverse of gather_kv_blocks: payload entry i goes to destination block
// block_ids[i] of the K and V caches.
extern "C" __global__ void scatter_kv_blocks(
    const kv_word16_t* __restrict__ in,
    const kv_block_id_t* __restrict__ block_ids,
    kv_block_id_t n_blocks,
    kv_block_id_t n_cache_blocks,
    kv_size_t half_block_elems,
    kv_word16_t* __restrict__ k_cache,
    kv_word16_t* __restrict__ v_cache)
{
    kv_scatter<kv_word16_t>(in, block_ids, n_blocks, n_cache_blocks, half_block_elems, k_cache, v_cache);
}

// Vectorized variants: the same copies in 16-byte words (one 128-bit load and
// store per thread per step, 8 f16 at a time). Preconditions, checked by the
// host: the half block is a multiple of 16 bytes (true for any head_dim that
// is a multiple of 8 in f16) and every base pointer is 16-byte aligned
// (cudaMalloc gives 256). `half_block_words` counts 16-byte words.
extern "C" __global__ void gather_kv_blocks_vec16(
    const kv_word128_t* __restrict__ k_cache,
    const kv_word128_t* __restrict__ v_cache,
    const kv_block_id_t* __restrict__ block_ids,
    kv_block_id_t n_blocks,
    kv_block_id_t n_cache_blocks,
    kv_size_t half_block_words,
    kv_word128_t* __restrict__ out)
{
    kv_gather<kv_word128_t>(k_cache, v_cache, block_ids, n_blocks, n_cache_blocks, half_block_words, out);
}

extern "C" __global__ void scatter_kv_blocks_vec16(
    const kv_word128_t* __restrict__ in,
    const kv_block_id_t* __restrict__ block_ids,
    kv_block_id_t n_blocks,
    kv_block_id_t n_cache_blocks,
    kv_size_t half_block_words,
    kv_word128_t* __restrict__ k_cache,
    kv_word128_t* __restrict__ v_cache)
{
    kv_scatter<kv_word128_t>(in, block_ids, n_blocks, n_cache_blocks, half_block_words, k_cache, v_cache);
}
