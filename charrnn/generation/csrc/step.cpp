// charrnn's sampling kernel: whole sampling loops for a CharRNN in one call (see
// charrnn/generation/native.py, which packs the weights and builds this file on first use).
//
// Why a kernel of our own: sampling one stream is bound by reading the weights once per
// character, and by the cost of launching a dozen small torch ops per layer. Here a step
// is one call: every thread owns a fixed slice of hidden units in every layer, so the
// rows of the weights it reads (int8 by default, a quarter of fp32) stay in its own L2
// cache from one character to the next; the gates of a unit sit in adjacent rows, so the
// cell's arithmetic runs right after its products, with no pass over a gates tensor.
//
// Rows of weights come in two kinds (the same code, templated):
//   float  - exact: products in fp32, as torch does them (within 1e-5 of nn.LSTM).
//   int8_t - each row quantized with its own scale (absmax / 127); the activations are
//            quantized per vector to int16, so the products are integer dot products
//            (vpdpwssd / vpmaddwd on x86) accumulated in int32.
// Batches of streams run on AMX tiles where the CPU has them (the section "many streams").
// The sampling rule (pick_row) is the one charrnn.generation.processors.pick_next applies with torch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {


// A vector ready to multiply: floats as they are, or int16 with one scale.
struct Activation {
  std::vector<float> f;
  std::vector<int16_t> q;
  float scale = 1.f;
};

void prepare(const float* x, int64_t n, bool quantize, Activation& out) {
  if (!quantize) {
    out.f.assign(x, x + n);
    return;
  }
  float absmax = 0.f;
  for (int64_t k = 0; k < n; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  // int8 x int16 products of n terms must fit int32: |sum| <= 127 * qmax * n < 2^31.
  const float qmax = std::min(32767.f, std::floor(2147483647.f / (127.f * n)));
  const float inv = absmax > 0.f ? qmax / absmax : 0.f;
  out.scale = absmax > 0.f ? absmax / qmax : 0.f;
  out.q.resize(n);
  for (int64_t k = 0; k < n; ++k) out.q[k] = static_cast<int16_t>(std::nearbyint(x[k] * inv));
}

// M dot products at once (rows w, w + n, ... against one vector): with M = 4, four
// independent chains hide the latency of each multiply-add, and x is loaded once for all.
template <int M>
inline void dots(const float* w, const Activation& a, int64_t n, float* y) {
  const float* x = a.f.data();
  int64_t k = 0;
  float s[M] = {};
#if defined(__AVX512F__)
  __m512 v[M];
  for (int i = 0; i < M; ++i) v[i] = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int i = 0; i < M; ++i) v[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i * n + k), xv, v[i]);
  }
  for (int i = 0; i < M; ++i) s[i] = _mm512_reduce_add_ps(v[i]);
#endif
  for (; k < n; ++k)
    for (int i = 0; i < M; ++i) s[i] += w[i * n + k] * x[k];
  for (int i = 0; i < M; ++i) y[i] = s[i];
}

template <int M>
inline void dots(const int8_t* w, const Activation& a, int64_t n, float* y) {
  const int16_t* x = a.q.data();
  int64_t k = 0;
  int32_t s[M] = {};
#if defined(__AVX512BW__)
  __m512i v[M];
  for (int i = 0; i < M; ++i) v[i] = _mm512_setzero_si512();
  for (; k + 32 <= n; k += 32) {
    const __m512i xv = _mm512_loadu_si512(x + k);
    for (int i = 0; i < M; ++i) {
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * n + k)));
#if defined(__AVX512VNNI__)
      v[i] = _mm512_dpwssd_epi32(v[i], wv, xv);
#else
      v[i] = _mm512_add_epi32(v[i], _mm512_madd_epi16(wv, xv));
#endif
    }
  }
  for (int i = 0; i < M; ++i) s[i] = _mm512_reduce_add_epi32(v[i]);
#endif
  for (; k < n; ++k)
    for (int i = 0; i < M; ++i) s[i] += static_cast<int32_t>(w[i * n + k]) * static_cast<int32_t>(x[k]);
  for (int i = 0; i < M; ++i) y[i] = static_cast<float>(s[i]) * a.scale;
}

inline float sigmoid(float x) {
  x = std::min(std::max(x, -80.f), 80.f);  // exp stays finite
  return 1.f / (1.f + std::exp(-x));
}
inline float tanh_(float x) { return 2.f * sigmoid(2.f * x) - 1.f; }

// --- the cells ---------------------------------------------------------------------------------
//
// Which cells there are, their gate counts and whether they carry a cell state c come from
// Python (charrnn.model.CELL_TABLE: kernel_id, gates, has_cell_state). All this file knows
// of a cell is its arithmetic in cell_update, and what that arithmetic reads (kArithmetic),
// so that a table the arithmetic does not fit is refused with a sentence, not read out of
// bounds. A new cell: a row in CELL_TABLE, a row in kArithmetic, a case in cell_update.
enum Arithmetic : int64_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

struct ArithmeticShape {
  const char* name;
  int64_t gates;    // gate blocks cell_update reads from gx and gh
  bool cell_state;  // whether it reads c and writes c_out
};
constexpr ArithmeticShape kArithmetic[] = {{"LSTM", 4, true}, {"GRU", 3, false}, {"RNN_TANH", 1, false}, {"RNN_RELU", 1, false}};
constexpr int64_t kArithmetics = sizeof(kArithmetic) / sizeof(kArithmetic[0]);

// A cell as Python describes it, checked against the arithmetic it names.
struct Cell {
  int64_t kind, gates;
  bool has_c;

  Cell(int64_t kind, int64_t gates, bool has_c) : kind(kind), gates(gates), has_c(has_c) {
    TORCH_CHECK(kind >= 0 && kind < kArithmetics, "kernel_id ", kind, " names no arithmetic of step.cpp's cell_update (0 to ",
                kArithmetics - 1, "): add its case there");
    const ArithmeticShape& a = kArithmetic[kind];
    TORCH_CHECK(gates == a.gates && has_c == a.cell_state, "the cell table gives kernel_id ", kind, " ", gates,
                " gates and has_cell_state=", has_c ? "True" : "False", ", but step.cpp's ", a.name, " arithmetic reads ",
                a.gates, " gates and ", a.cell_state ? "a" : "no", " cell state: charrnn.model.CELL_TABLE and ",
                "cell_update disagree");
  }
};

// The cell's arithmetic for n units; gx / gh hold G gate pre-activations, gate-major.
void cell_update(int64_t cell, int64_t n, const float* gx, const float* gh, const float* h, const float* c,
                 float* h_out, float* c_out) {
  if (cell == LSTM) {  // gates i, f, g, o
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) {
      const float cc = sigmoid(gx[n + u] + gh[n + u]) * c[u] + sigmoid(gx[u] + gh[u]) * tanh_(gx[2 * n + u] + gh[2 * n + u]);
      c_out[u] = cc;
      h_out[u] = sigmoid(gx[3 * n + u] + gh[3 * n + u]) * tanh_(cc);
    }
  } else if (cell == GRU) {  // gates r, z, n; the hidden part of n is scaled by r
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) {
      const float r = sigmoid(gx[u] + gh[u]), z = sigmoid(gx[n + u] + gh[n + u]);
      const float nn = tanh_(gx[2 * n + u] + r * gh[2 * n + u]);
      h_out[u] = nn + z * (h[u] - nn);
    }
  } else {
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) {
      const float s = gx[u] + gh[u];
      h_out[u] = cell == RNN_TANH ? tanh_(s) : std::max(s, 0.f);
    }
  }
}

// A matrix of rows in unit-major order (row u * G + g), with per-row scales for int8.
template <typename W>
struct Matrix {
  const W* w = nullptr;
  const float* scale = nullptr;  // int8 only
  const float* bias = nullptr;
  int64_t cols = 0;

  // y[i] = row (r0 + i) . a, scaled and biased, for rows [r0, r1): four rows at a time.
  void rows(int64_t r0, int64_t r1, const Activation& a, float* y) const {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) dots<4>(w + r * cols, a, cols, y + r - r0);
    for (; r < r1; ++r) dots<1>(w + r * cols, a, cols, y + r - r0);
    for (r = r0; r < r1; ++r) y[r - r0] = (scale ? y[r - r0] * scale[r] : y[r - r0]) + (bias ? bias[r] : 0.f);
  }
};

template <typename W>
Matrix<W> matrix(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias) {
  Matrix<W> m;
  if (!w.defined() || w.numel() == 0) return m;
  m.w = w.data_ptr<W>();
  m.scale = scale.numel() ? scale.data_ptr<float>() : nullptr;
  m.bias = bias.numel() ? bias.data_ptr<float>() : nullptr;
  m.cols = w.size(1);
  return m;
}

// The packed weights of one model, built once in Python (see charrnn/generation/native.py) and kept
// alive here. Per layer l: w_x[l] (l > 0) and w_h[l], rows unit-major; layer 0's input
// product is the table (V, G * H). int8 weights come with per-row scales s_*.
struct Packed {
  Cell cell;
  int64_t G;
  at::Tensor table0, w_o, s_o, b_o;
  std::vector<at::Tensor> w_x, s_x, b_x, w_h, s_h, b_h;

  Packed(int64_t kind, int64_t gates, bool has_c, at::Tensor table0, std::vector<at::Tensor> w_x,
         std::vector<at::Tensor> s_x, std::vector<at::Tensor> b_x, std::vector<at::Tensor> w_h,
         std::vector<at::Tensor> s_h, std::vector<at::Tensor> b_h, at::Tensor w_o, at::Tensor s_o, at::Tensor b_o)
      : cell(kind, gates, has_c), G(gates), table0(table0), w_o(w_o), s_o(s_o), b_o(b_o), w_x(w_x), s_x(s_x),
        b_x(b_x), w_h(w_h), s_h(s_h), b_h(b_h) {}

  struct Scratch {  // none: each thread's buffers live in its parallel section
    Scratch(const Packed&, int64_t) {}
  };
  int64_t layers() const { return static_cast<int64_t>(w_h.size()); }
  int64_t hidden() const { return w_h[0].size(1); }
  int64_t vocab() const { return w_o.size(0); }
  bool quantized() const { return w_o.scalar_type() == at::kChar; }
};

// One character for B streams: tokens in, logits and the new state out (c only for a cell with one).
template <typename W>
void advance(const Packed& p, int64_t B, const int64_t* tok, const float* h_old, const float* c_old, float* h_out,
             float* c_out, float* logits) {
  const bool quantized = std::is_same<W, int8_t>::value;
  const int64_t L = p.layers(), H = p.hidden(), V = p.vocab(), G = p.G, cell = p.cell.kind;
  const float* t0 = p.table0.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l) {
    const Matrix<W> mx = l ? matrix<W>(p.w_x[l], p.s_x[l], p.b_x[l]) : Matrix<W>();
    const Matrix<W> mh = matrix<W>(p.w_h[l], p.s_h[l], p.b_h[l]);
    const float* below = l ? h_out + (l - 1) * B * H : nullptr;  // this step's output of layer l - 1
    // The same split of units into threads every call, so each thread keeps reading the same rows.
    at::parallel_for(0, H, 1, [&](int64_t u0, int64_t u1) {
      const int64_t n = u1 - u0;
      Activation ax, ah;
      std::vector<float> yx(G * n), yh(G * n);  // products, unit-major as the rows are stored
      std::vector<float> gx(G * n), gh(G * n);  // the same gate-major, so the cell's loop vectorizes
      for (int64_t b = 0; b < B; ++b) {
        prepare(h_old + (l * B + b) * H, H, quantized, ah);
        mh.rows(u0 * G, u1 * G, ah, yh.data());
        if (l) {
          prepare(below + b * H, mx.cols, quantized, ax);
          mx.rows(u0 * G, u1 * G, ax, yx.data());
        } else {
          std::copy_n(t0 + tok[b] * G * H + u0 * G, G * n, yx.data());
        }
        for (int64_t i = 0; i < n; ++i)
          for (int64_t g = 0; g < G; ++g) gx[g * n + i] = yx[i * G + g], gh[g * n + i] = yh[i * G + g];
        const int64_t at = (l * B + b) * H + u0;
        cell_update(cell, n, gx.data(), gh.data(), h_old + at, c_old ? c_old + at : nullptr, h_out + at,
                    c_out ? c_out + at : nullptr);
      }
    });
  }
  const Matrix<W> mo = matrix<W>(p.w_o, p.s_o, p.b_o);
  const float* top = h_out + (L - 1) * B * H;
  Activation a;
  for (int64_t b = 0; b < B; ++b) {
    prepare(top + b * H, H, quantized, a);
    mo.rows(0, V, a, logits + b * V);
  }
}

void advance(const Packed& p, int64_t B, const int64_t* tok, const float* h_old, const float* c_old, float* h_out,
             float* c_out, float* logits, Packed::Scratch&) {
  if (p.quantized())
    advance<int8_t>(p, B, tok, h_old, c_old, h_out, c_out, logits);
  else
    advance<float>(p, B, tok, h_old, c_old, h_out, c_out, logits);
}

// --- many streams: products on AMX tiles --------------------------------------------------
//
// From about 8 streams on, a step is a batch of matrix products, and Intel's AMX units
// multiply 16 x 32 bfloat16 tiles in one instruction. The weights keep torch's gate-major
// row order here and are packed once into tiles; each step converts the inputs to
// bfloat16 (16-row blocks of streams), multiplies (threads split the output columns),
// then runs the cells in float32 (threads split the streams). The products accumulate in
// float32, so only the inputs and weights are rounded to bfloat16.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define CHARRNN_AMX 1

bool amx_permitted() {
  // Linux hands out the 8 KB of tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) rows[t] = 16, colsb[t] = 64;  // every tile: 16 rows of 64 bytes
  }
};

// W (n, k) as bfloat16 tiles: tile (j, i) covers outputs 16j.. and inputs 32i.., stored as
// 16 rows of (16 outputs x 2 adjacent inputs), the layout the tile multiply reads.
struct TileMatrix {
  int64_t n = 0, k = 0, n_blocks = 0, k_blocks = 0;
  std::vector<at::BFloat16> tiles;
  std::vector<float> bias;  // n_blocks * 16 values (zeros where there is no bias)

  TileMatrix() = default;
  TileMatrix(const at::Tensor& weight, const at::Tensor& b) {
    const at::Tensor w = weight.to(at::kFloat).contiguous();
    n = w.size(0), k = w.size(1), n_blocks = (n + 15) / 16, k_blocks = (k + 31) / 32;
    tiles.assign(n_blocks * k_blocks * 512, at::BFloat16(0.f));
    const float* src = w.data_ptr<float>();
    for (int64_t j = 0; j < n_blocks; ++j)
      for (int64_t i = 0; i < k_blocks; ++i)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t c = 0; c < 16; ++c)
            for (int64_t q = 0; q < 2; ++q) {
              const int64_t row = j * 16 + c, col = i * 32 + 2 * r + q;
              if (row < n && col < k) tiles[((j * k_blocks + i) * 16 + r) * 32 + c * 2 + q] = src[row * k + col];
            }
    bias.assign(n_blocks * 16, 0.f);
    if (b.numel()) std::copy_n(b.data_ptr<float>(), n, bias.begin());
  }

  // out (rows of n_blocks * 16 floats) = a (m_blocks * 16 rows of k_blocks * 32 bf16) @ W.T + bias,
  // for output blocks [j0, j1); up to four 16-row blocks of a share each loaded weight tile.
  void multiply(const at::BFloat16* a, int64_t m_blocks, float* out, int64_t j0, int64_t j1) const {
    const int64_t lda = k_blocks * 64, ldo = n_blocks * 64;  // bytes per row
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t m = 0; m < m_blocks; m += 4) {
        const int64_t count = std::min<int64_t>(4, m_blocks - m);
        const float* b = bias.data() + j * 16;  // stride 0: every row of the tile starts as the bias
        _tile_loadd(0, b, 0);
        _tile_loadd(1, b, 0);
        _tile_loadd(2, b, 0);
        _tile_loadd(3, b, 0);
        for (int64_t i = 0; i < k_blocks; ++i) {
          // The weights stream from L3 each step; fetch the tile after next while this one multiplies.
          const char* ahead = reinterpret_cast<const char*>(tiles.data() + (j * k_blocks + i + 2) * 512);
          if (ahead < reinterpret_cast<const char*>(tiles.data() + tiles.size()))
            for (int line = 0; line < 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
          _tile_loadd(5, tiles.data() + (j * k_blocks + i) * 512, 64);
          const at::BFloat16* block = a + m * 16 * k_blocks * 32 + i * 32;
          _tile_loadd(4, block, lda);
          _tile_dpbf16ps(0, 4, 5);
          if (count > 1) {
            _tile_loadd(4, block + 16 * k_blocks * 32, lda);
            _tile_dpbf16ps(1, 4, 5);
          }
          if (count > 2) {
            _tile_loadd(4, block + 32 * k_blocks * 32, lda);
            _tile_dpbf16ps(2, 4, 5);
          }
          if (count > 3) {
            _tile_loadd(4, block + 48 * k_blocks * 32, lda);
            _tile_dpbf16ps(3, 4, 5);
          }
        }
        float* o = out + m * 16 * n_blocks * 16 + j * 16;
        _tile_stored(0, o, ldo);
        if (count > 1) _tile_stored(1, o + 16 * n_blocks * 16, ldo);
        if (count > 2) _tile_stored(2, o + 32 * n_blocks * 16, ldo);
        if (count > 3) _tile_stored(3, o + 48 * n_blocks * 16, ldo);
      }
  }
};

struct TileScratch;

struct TilePacked {
  using Scratch = TileScratch;
  Cell cell;
  int64_t G, H, V;
  at::Tensor table0;  // (V, G * H) gate-major: embedding @ W_ih0.T + biases
  std::vector<TileMatrix> x, h;  // x[0] unused
  TileMatrix head;

  TilePacked(int64_t kind, int64_t gates, bool has_c, at::Tensor table0, std::vector<at::Tensor> w_x, std::vector<at::Tensor> b_x,
             std::vector<at::Tensor> w_h, std::vector<at::Tensor> b_h, at::Tensor w_o, at::Tensor b_o)
      : cell(kind, gates, has_c), G(gates), H(w_h[0].size(1)), V(w_o.size(0)),
        table0(table0.contiguous()), head(w_o, b_o) {
    TORCH_CHECK(amx_permitted(), "the kernel may not use AMX tiles here");
    for (size_t l = 0; l < w_h.size(); ++l) {
      x.push_back(l ? TileMatrix(w_x[l], b_x[l]) : TileMatrix());
      h.emplace_back(w_h[l], b_h[l]);
    }
  }
  int64_t layers() const { return static_cast<int64_t>(h.size()); }
  int64_t hidden() const { return H; }
  int64_t vocab() const { return V; }
};

// Buffers of one batch of B streams, kept across the steps of a sampling call. Rows of
// the bfloat16 inputs past B stay zero, so partial 16-row blocks multiply harmlessly.
struct TileScratch {
  int64_t m_blocks;
  std::vector<std::vector<at::BFloat16>> h;  // per layer: the state coming in, as tile rows
  std::vector<at::BFloat16> below;           // this step's output of the layer below
  std::vector<float> gx, gh, out;            // products: inputs', hidden state's, the head's

  TileScratch(const TilePacked& p, int64_t B) : m_blocks((B + 15) / 16) {
    const int64_t rows = m_blocks * 16, inputs = p.h[0].k_blocks * 32, gates = p.h[0].n_blocks * 16;
    h.assign(p.h.size(), std::vector<at::BFloat16>(rows * inputs, at::BFloat16(0.f)));
    below.assign(rows * inputs, at::BFloat16(0.f));
    gx.resize(rows * gates), gh.resize(rows * gates), out.resize(rows * p.head.n_blocks * 16);
  }
};

void multiply_all(const std::vector<std::pair<const TileMatrix*, std::pair<const at::BFloat16*, float*>>>& jobs,
                  int64_t m_blocks) {
  int64_t total = 0;
  for (auto& job : jobs) total += job.first->n_blocks;
  // Threads split the output blocks of all the products of this phase.
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    TileConfig config;
    _tile_loadconfig(&config);
    int64_t offset = 0;
    for (auto& job : jobs) {
      const TileMatrix& w = *job.first;
      const int64_t j0 = std::max<int64_t>(begin - offset, 0), j1 = std::min<int64_t>(end - offset, w.n_blocks);
      if (j0 < j1) w.multiply(job.second.first, m_blocks, job.second.second, j0, j1);
      offset += w.n_blocks;
    }
    _tile_release();
  });
}

void advance(const TilePacked& p, int64_t B, const int64_t* tok, const float* h_old, const float* c_old, float* h_out,
             float* c_out, float* logits, TileScratch& s) {
  const int64_t L = static_cast<int64_t>(p.h.size()), H = p.H, G = p.G, m_blocks = s.m_blocks;
  const int64_t width = p.h[0].k_blocks * 32, gates = p.h[0].n_blocks * 16;
  const float* t0 = p.table0.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t i = 0; i < H; ++i) s.h[l][b * width + i] = h_old[(l * B + b) * H + i];
  });
  for (int64_t l = 0; l < L; ++l) {
    if (l)
      multiply_all({{&p.h[l], {s.h[l].data(), s.gh.data()}}, {&p.x[l], {s.below.data(), s.gx.data()}}}, m_blocks);
    else
      multiply_all({{&p.h[l], {s.h[l].data(), s.gh.data()}}}, m_blocks);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t at = (l * B + b) * H;
        const float* x = l ? s.gx.data() + b * gates : t0 + tok[b] * G * H;
        cell_update(p.cell.kind, H, x, s.gh.data() + b * gates, h_old + at, c_old ? c_old + at : nullptr, h_out + at,
                    c_out ? c_out + at : nullptr);
        for (int64_t i = 0; i < H; ++i) s.below[b * width + i] = h_out[at + i];
      }
    });
  }
  multiply_all({{&p.head, {s.below.data(), s.out.data()}}}, m_blocks);
  for (int64_t b = 0; b < B; ++b) std::copy_n(s.out.data() + b * p.head.n_blocks * 16, p.V, logits + b * p.V);
}
#endif

// Draw one token from one row of logits, by inverse CDF over the kept characters in index
// order, with the uniform u in [0, 1). The same rule as charrnn.generation.processors.pick_next.
int64_t pick_row(const float* logits, int64_t V, double u, double temperature, int64_t top_k, double top_p,
                 std::vector<double>& prob, std::vector<int64_t>& order) {
  if (temperature == 0) return std::max_element(logits, logits + V) - logits;
  const double high = *std::max_element(logits, logits + V);
  prob.resize(V);
  for (int64_t v = 0; v < V; ++v) prob[v] = std::exp((logits[v] - high) / temperature);
  if (top_k > 0 && top_k < V) {  // keep the k largest, ties at the k-th kept
    std::vector<double> sorted(prob);
    std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<double>());
    const double kth = sorted[top_k - 1];
    for (double& q : prob) q = q < kth ? 0.0 : q;
  }
  if (top_p < 1) {  // keep the likeliest characters until they reach top_p; the first always stays
    order.resize(V);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return prob[a] > prob[b]; });
    const double total = std::accumulate(prob.begin(), prob.end(), 0.0);
    double before = 0;
    for (int64_t v : order) {
      const double q = prob[v];
      if (before >= top_p * total) prob[v] = 0;
      before += q;
    }
  }
  const double target = u * std::accumulate(prob.begin(), prob.end(), 0.0);
  double cumulative = 0;
  int64_t last = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (prob[v] == 0) continue;
    cumulative += prob[v];
    last = v;
    if (cumulative > target) return v;
  }
  return last;  // rounding left target at the very top
}

// What the public entry points take from Python, checked: a wrong shape or id would
// otherwise read out of bounds.
void check_tokens(const at::Tensor& tokens, int64_t B, int64_t vocab) {
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.numel() == B,
              "tokens must be B contiguous int64 ids");
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(tok[b] >= 0 && tok[b] < vocab, "token ids must be in [0, ", vocab, ")");
}

void check_state(const at::Tensor& h, const at::Tensor& c, bool has_c, int64_t layers, int64_t hidden) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.dim() == 3 && h.size(0) == layers &&
                  h.size(2) == hidden,
              "the hidden state must be contiguous float32 (", layers, ", B, ", hidden, ")");
  TORCH_CHECK(!has_c || (c.sizes() == h.sizes() && c.scalar_type() == at::kFloat && c.is_contiguous()),
              "the cell state c must match the hidden state");
}

// pick_row for each of B rows of logits (B, V), one uniform each, into out.
void pick_rows(const float* logits, int64_t B, int64_t V, const double* uniforms, double temperature, int64_t top_k,
               double top_p, int64_t* out) {
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<double> prob;
    std::vector<int64_t> order;
    for (int64_t b = b0; b < b1; ++b)
      out[b] = pick_row(logits + b * V, V, uniforms[b], temperature, top_k, top_p, prob, order);
  });
}

at::Tensor hidden_like(const at::Tensor& h, int64_t steps) {
  return at::empty({steps, h.size(0), h.size(1), h.size(2)}, h.options());
}

// tokens (B,) -> [logits (B, V), h, c]: one step, as charrnn.generation.stepper.Stepper.step.
template <typename P>
std::vector<at::Tensor> step(const P& p, const at::Tensor& tokens, const at::Tensor& h, const at::Tensor& c) {
  const int64_t B = h.size(1);
  check_tokens(tokens, B, p.vocab());
  const bool has_c = p.cell.has_c;
  check_state(h, c, has_c, p.layers(), p.hidden());
  at::Tensor logits = at::empty({B, p.vocab()}, h.options());
  at::Tensor h_new = at::empty_like(h);
  at::Tensor c_new = has_c ? at::empty_like(c) : at::empty({0}, h.options());
  {
    pybind11::gil_scoped_release no_gil;  // threads sharing one model step in parallel
    typename P::Scratch scratch(p, B);
    advance(p, B, tokens.data_ptr<int64_t>(), h.data_ptr<float>(), has_c ? c.data_ptr<float>() : nullptr,
            h_new.data_ptr<float>(), has_c ? c_new.data_ptr<float>() : nullptr, logits.data_ptr<float>(),
            scratch);
  }
  return {logits, h_new, c_new};
}

// K characters for B streams, from the logits and state before the first of them:
// token k is drawn with uniforms[k] from the logits before it, then fed. Returns
// [tokens (K, B), logits (S, B, V), h (S, L, B, H), c (S, L, B, H) or (S, 0)]: with
// every_state, S = K and entry k is the state right after token k, so a caller can stop
// at any of them; otherwise S = 2 and only entry (K - 1) % 2, the state after the last
// token, is kept (the two alternate, so nothing grows with K).
template <typename P>
std::vector<at::Tensor> sample(const P& p, const at::Tensor& logits, const at::Tensor& h, const at::Tensor& c,
                               const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p,
                               bool every_state) {
  const int64_t K = uniforms.size(0), B = h.size(1), V = p.vocab(), HS = h.numel();
  const bool has_c = p.cell.has_c;
  check_state(h, c, has_c, p.layers(), p.hidden());
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 2 &&
                  logits.size(0) == B && logits.size(1) == V && uniforms.scalar_type() == at::kDouble &&
                  uniforms.is_contiguous() && uniforms.dim() == 2 && uniforms.size(1) == B,
              "sample wants float32 logits (B, V) and float64 uniforms (K, B)");
  at::Tensor tokens = at::empty({K, B}, uniforms.options().dtype(at::kLong));
  const int64_t S = every_state ? K : 2;
  at::Tensor logits_seq = at::empty({S, B, V}, h.options());
  at::Tensor h_seq = hidden_like(h, S);
  // Without a cell state, S empty rows: entry k is then an empty c, as step returns it.
  at::Tensor c_seq = has_c ? hidden_like(c, S) : at::empty({S, 0}, h.options());
  {
    pybind11::gil_scoped_release no_gil;
    const double* u = uniforms.data_ptr<double>();
    int64_t* tok = tokens.data_ptr<int64_t>();
    float *ls = logits_seq.data_ptr<float>(), *hs = h_seq.data_ptr<float>(), *cs = has_c ? c_seq.data_ptr<float>() : nullptr;
    typename P::Scratch scratch(p, B);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t now = k % S, before = (k - 1) % S;  // slots of this step and the one before
      const float* prev_logits = k ? ls + before * B * V : logits.data_ptr<float>();
      pick_rows(prev_logits, B, V, u + k * B, temperature, top_k, top_p, tok + k * B);
      const float* h_old = k ? hs + before * HS : h.data_ptr<float>();
      const float* c_old = has_c ? (k ? cs + before * HS : c.data_ptr<float>()) : nullptr;
      advance(p, B, tok + k * B, h_old, c_old, hs + now * HS, has_c ? cs + now * HS : nullptr, ls + now * B * V, scratch);
    }
  }
  return {tokens, logits_seq, h_seq, c_seq};
}

// The picks of pick_row for each row of logits (B, V), one uniform each.
at::Tensor pick(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                double top_p) {
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 2 &&
                  uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous() && uniforms.numel() == B,
              "pick wants float32 logits (B, V) and B float64 uniforms");
  auto picked = at::empty({B}, logits.options().dtype(at::kLong));
  const float* l = logits.data_ptr<float>();
  const double* u = uniforms.data_ptr<double>();
  int64_t* out = picked.data_ptr<int64_t>();
  pybind11::gil_scoped_release no_gil;
  pick_rows(l, B, V, u, temperature, top_k, top_p, out);
  return picked;
}

// Row b of a (B, n) float or bfloat16 tensor as floats: the row itself, or converted into buf.
const float* float_row(const at::Tensor& t, int64_t b, std::vector<float>& buf) {
  const int64_t n = t.size(1);
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>() + b * n;
  const at::BFloat16* src = t.data_ptr<at::BFloat16>() + b * n;
  buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf.data();
}

// The cell of one layer for a batch, from its gate products (B, G * H), float or bfloat16,
// in torch's gate-major order. Layer 0 passes the table (V, G * H) as gx and the tokens
// that pick its rows. Reads h[layer], c[layer] (L, B, H); writes h_out[layer] and
// c_out[layer], and h_out[layer] in bfloat16 into x_next when given (the next product's input).
void cell(int64_t kind, int64_t gates, bool has_c, const at::Tensor& gx, const at::Tensor& gh, const at::Tensor& h,
          const at::Tensor& c, int64_t layer, at::Tensor& h_out, at::Tensor& c_out, const at::Tensor& tokens,
          at::Tensor& x_next) {
  [[maybe_unused]] const Cell checked(kind, gates, has_c);  // refuses a table its arithmetic does not fit
  const int64_t B = h.size(1), H = h.size(2), at0 = layer * B * H;
  const int64_t* tok = tokens.numel() ? tokens.data_ptr<int64_t>() : nullptr;
  if (tok) check_tokens(tokens, B, gx.size(0));
  const float *ph = h.data_ptr<float>() + at0, *pc = has_c ? c.data_ptr<float>() + at0 : nullptr;
  float *qh = h_out.data_ptr<float>() + at0, *qc = has_c ? c_out.data_ptr<float>() + at0 : nullptr;
  at::BFloat16* xn = x_next.numel() ? x_next.data_ptr<at::BFloat16>() : nullptr;
  pybind11::gil_scoped_release no_gil;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> bx, by;
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = float_row(gx, tok ? tok[b] : b, bx);
      cell_update(kind, H, x, float_row(gh, b, by), ph + b * H, has_c ? pc + b * H : nullptr, qh + b * H,
                  has_c ? qc + b * H : nullptr);
      if (xn)
        for (int64_t i = 0; i < H; ++i) xn[b * H + i] = static_cast<at::BFloat16>(qh[b * H + i]);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Packed>(m, "Packed")
      .def(pybind11::init<int64_t, int64_t, bool, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>());
  m.def("step", &step<Packed>, "one fused step for B streams");
  m.def("sample", &sample<Packed>, "K sampled steps for B streams");
#ifdef CHARRNN_AMX
  pybind11::class_<TilePacked>(m, "TilePacked")
      .def(pybind11::init<int64_t, int64_t, bool, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>());
  m.def("step", &step<TilePacked>, "one step for B streams on AMX tiles");
  m.def("sample", &sample<TilePacked>, "K sampled steps for B streams on AMX tiles");
  m.def("tiles_usable", &amx_permitted, "whether the OS lets this process use AMX tiles");
#endif
  m.def("pick", &pick, "one pick per row of logits");
  m.def("cell", &cell, "one layer's cell for a batch, from its gate products");
}
