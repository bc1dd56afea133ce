// gati order-preserving batch compaction: the rows a cache did not answer
// (hit == 0) move to the front of a new buffer, in their original order.
//
// gati_compact_index (one block, rows <= blockDim.x <= 1024): an exclusive
//   scan of the miss flags; src_of_dst[j] = original index of the j-th miss,
//   count[0] = misses. Everything stays on the device.
// gati_gather_rows: dst[j, :] = src[src_of_dst[j], :] for j < count[0];
//   grid.y strides over destination rows, grid.x * blockDim.x over a row.

extern "C" __global__ void gati_compact_index(
    const int* __restrict__ hit, int rows,
    int* __restrict__ src_of_dst, int* __restrict__ count)
{
    extern __shared__ int scan[];
    const int i = threadIdx.x;
    const int miss = (i < rows && hit[i] == 0) ? 1 : 0;
    scan[i] = miss;
    __syncthreads();
    // Hillis-Steele inclusive scan.
    for (int off = 1; off < blockDim.x; off <<= 1) {
        int v = i >= off ? scan[i - off] : 0;
        __syncthreads();
        scan[i] += v;
        __syncthreads();
    }
    if (miss) {
        src_of_dst[scan[i] - 1] = i;
    }
    if (i == blockDim.x - 1) {
        count[0] = scan[i];
    }
}

extern "C" __global__ void gati_gather_rows(
    const float* __restrict__ src, float* __restrict__ dst,
    const int* __restrict__ src_of_dst, const int* __restrict__ count,
    long row_len)
{
    const int n = count[0];
    for (int j = blockIdx.y; j < n; j += gridDim.y) {
        const float* from = src + (long)src_of_dst[j] * row_len;
        float* to = dst + (long)j * row_len;
        for (long k = (long)blockIdx.x * blockDim.x + threadIdx.x; k < row_len; k += (long)gridDim.x * blockDim.x) {
            to[k] = from[k];
        }
    }
}
