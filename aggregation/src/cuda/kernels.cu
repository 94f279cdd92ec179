// Kernels of the CUDA compute backend (aggregation/src/cuda.rs), compiled at
// start-up with NVRTC for the device's architecture, with `--fmad=false` so
// that every multiply and add rounds exactly as the CPU reference does.
//
// Matrices of updates are row-major: row i (one update) is x[i*d .. i*d+d].
// Per-coordinate kernels run one thread per coordinate j; the threads of a
// warp read consecutive coordinates of one row, so no transpose is needed.

typedef unsigned long long u64;

// Most updates a per-coordinate kernel sorts (a local array per thread).
#define MAX_ROWS 512

// acc[off + i] += w * x[i] for i < len, in f64.
extern "C" __global__ void accumulate(double* acc, const float* x, double w, u64 off, u64 len) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        acc[off + i] += w * (double)x[i];
    }
}

// One server-optimiser step; `kind` and the rules follow
// ServerOptimizer::apply: 0 Sgd, 1 Momentum (a = momentum), 2 Adagrad
// (a = beta1), 3 Adam and 4 Yogi (a = beta1, b = beta2).
extern "C" __global__ void server_step(int kind, float lr, float a, float b, float tau,
                                       float* x, const float* d, float* m, float* v, u64 len) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        float di = d[i];
        if (kind == 0) {
            x[i] += lr * di;
        } else if (kind == 1) {
            float mi = a * m[i] + di;
            m[i] = mi;
            x[i] += lr * mi;
        } else {
            float mi = a * m[i] + (1.0f - a) * di;
            float vi = v[i];
            if (kind == 2) {
                vi += di * di;
            } else if (kind == 3) {
                vi = b * vi + (1.0f - b) * di * di;
            } else {
                float d2 = di * di;
                float t = (1.0f - b) * d2;
                if (vi > d2) {
                    vi -= t;
                } else if (vi < d2) {
                    vi += t;
                }
            }
            m[i] = mi;
            v[i] = vi;
            x[i] += lr * mi / (sqrtf(vi) + tau);
        }
    }
}

// The n values of coordinate j, sorted ascending (insertion sort: stable
// with ties, and n is at most a few hundred).
__device__ void sorted_column(const float* x, int n, u64 d, u64 j, float* col) {
    for (int i = 0; i < n; ++i) {
        float v = x[(u64)i * d + j];
        int k = i - 1;
        while (k >= 0 && col[k] > v) {
            col[k + 1] = col[k];
            --k;
        }
        col[k + 1] = v;
    }
}

__device__ float median_sorted(const float* col, int n) {
    if (n & 1) {
        return col[n / 2];
    }
    return (float)(((double)col[n / 2 - 1] + (double)col[n / 2]) / 2.0);
}

__device__ float mean_range(const float* col, int lo, int hi) {
    double s = 0.0;
    for (int k = lo; k < hi; ++k) {
        s += (double)col[k];
    }
    return (float)(s / (double)(hi - lo));
}

extern "C" __global__ void median(const float* x, int n, u64 d, float* out) {
    float col[MAX_ROWS];
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        sorted_column(x, n, d, j, col);
        out[j] = median_sorted(col, n);
    }
}

extern "C" __global__ void trimmed_mean(const float* x, int n, u64 d, int trim, float* out) {
    float col[MAX_ROWS];
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        sorted_column(x, n, d, j, col);
        out[j] = mean_range(col, trim, n - trim);
    }
}

// The mean of the `keep` values closest to the median: the contiguous window
// of the sorted column with the least total distance (the first on ties).
extern "C" __global__ void mean_around_median(const float* x, int n, u64 d, int keep, float* out) {
    float col[MAX_ROWS];
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        sorted_column(x, n, d, j, col);
        double med = (double)median_sorted(col, n);
        int best = 0;
        double best_cost = 0.0;
        for (int s = 0; s + keep <= n; ++s) {
            double cost = 0.0;
            for (int k = s; k < s + keep; ++k) {
                cost += fabs((double)col[k] - med);
            }
            if (s == 0 || cost < best_cost) {
                best_cost = cost;
                best = s;
            }
        }
        out[j] = mean_range(col, best, best + keep);
    }
}

#define TILE 16
#define WIDTH 32

// Squared distances between rows, from the differences themselves (in f64,
// so no cancellation as with |a|^2 + |b|^2 - 2ab). Block (16, 16) computes the
// 16 x 16 pairs of row tiles (bi, bj), bi <= bj, numbered by blockIdx.x, over
// the coordinate segment blockIdx.y; partial sums are added into out[i*n + j]
// (i < j), which starts zeroed.
extern "C" __global__ void pair_distances(const float* x, int n, u64 d, u64 seg, double* out) {
    __shared__ float sa[TILE][WIDTH + 1];
    __shared__ float sb[TILE][WIDTH + 1];
    int tiles = (n + TILE - 1) / TILE;
    int p = blockIdx.x;
    int bi = 0;
    while (p >= tiles - bi) {
        p -= tiles - bi;
        ++bi;
    }
    int bj = bi + p;
    int tx = threadIdx.x;
    int ty = threadIdx.y;
    int tid = ty * TILE + tx;
    int i = bi * TILE + ty;
    int j = bj * TILE + tx;
    u64 start = (u64)blockIdx.y * seg;
    u64 end = start + seg < d ? start + seg : d;
    double acc = 0.0;
    for (u64 c0 = start; c0 < end; c0 += WIDTH) {
        for (int k = tid; k < TILE * WIDTH; k += TILE * TILE) {
            int r = k / WIDTH;
            int c = k % WIDTH;
            u64 col = c0 + c;
            int ri = bi * TILE + r;
            int rj = bj * TILE + r;
            sa[r][c] = (ri < n && col < end) ? x[(u64)ri * d + col] : 0.0f;
            sb[r][c] = (rj < n && col < end) ? x[(u64)rj * d + col] : 0.0f;
        }
        __syncthreads();
        for (int c = 0; c < WIDTH; ++c) {
            double t = (double)sa[ty][c] - (double)sb[tx][c];
            acc += t * t;
        }
        __syncthreads();
    }
    if (i < j && j < n) {
        atomicAdd(&out[(u64)i * n + j], acc);
    }
}
