// One character for B streams through a CharRNN, fused into a single call.
//
// Why a kernel of our own: sampling one stream is bound by reading the weights once per
// character, and by the cost of launching a dozen small torch ops per layer. Here a step
// is one call: every thread owns a fixed slice of hidden units in every layer, so the
// rows of the weights it reads (int8 by default, a quarter of fp32) stay in its own L2
// cache from one character to the next; the gates of a unit sit in adjacent rows, so the
// cell's arithmetic runs right after its products, with no pass over a gates tensor.
//
// Weights come in two kinds (the same code, templated):
//   float  - exact: products in fp32, as torch does them (within 1e-5 of nn.LSTM).
//   int8_t - each row quantized with its own scale (absmax / 127); the activations are
//            quantized per vector to int16, so the products are integer dot products
//            (vpdpwssd / vpmaddwd on x86, smlal on ARM) accumulated in int32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

enum Cell : int64_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

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

// The packed weights of one model, built once in Python (see charrnn/native.py) and kept
// alive here. Per layer l: w_x[l] (l > 0) and w_h[l], rows unit-major; layer 0's input
// product is the table (V, G * H). int8 weights come with per-row scales s_*.
struct Packed {
  int64_t cell, G;
  at::Tensor table0, w_o, s_o, b_o;
  std::vector<at::Tensor> w_x, s_x, b_x, w_h, s_h, b_h;

  Packed(int64_t cell, at::Tensor table0, std::vector<at::Tensor> w_x, std::vector<at::Tensor> s_x,
         std::vector<at::Tensor> b_x, std::vector<at::Tensor> w_h, std::vector<at::Tensor> s_h,
         std::vector<at::Tensor> b_h, at::Tensor w_o, at::Tensor s_o, at::Tensor b_o)
      : cell(cell), G(cell == LSTM ? 4 : cell == GRU ? 3 : 1), table0(table0), w_o(w_o), s_o(s_o), b_o(b_o),
        w_x(w_x), s_x(s_x), b_x(b_x), w_h(w_h), s_h(s_h), b_h(b_h) {}

  int64_t layers() const { return static_cast<int64_t>(w_h.size()); }
  int64_t hidden() const { return w_h[0].size(1); }
  int64_t vocab() const { return w_o.size(0); }
  bool quantized() const { return w_o.scalar_type() == at::kChar; }
};

// One character for B streams: tokens in, logits and the new state out (c only for LSTM).
template <typename W>
void advance(const Packed& p, int64_t B, const int64_t* tok, const float* h_old, const float* c_old, float* h_out,
             float* c_out, float* logits) {
  const bool quantized = std::is_same<W, int8_t>::value;
  const int64_t L = p.layers(), H = p.hidden(), V = p.vocab(), G = p.G, cell = p.cell;
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
             float* c_out, float* logits) {
  if (p.quantized())
    advance<int8_t>(p, B, tok, h_old, c_old, h_out, c_out, logits);
  else
    advance<float>(p, B, tok, h_old, c_old, h_out, c_out, logits);
}

// Draw one token from one row of logits, by inverse CDF over the kept characters in index
// order, with the uniform u in [0, 1). The same rule as charrnn.sampling.pick_next.
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

at::Tensor hidden_like(const at::Tensor& h, int64_t steps) {
  return at::empty({steps, h.size(0), h.size(1), h.size(2)}, h.options());
}

// tokens (B,) -> [logits (B, V), h, c]: one step, as charrnn.stepper.Stepper.step.
std::vector<at::Tensor> step(const Packed& p, const at::Tensor& tokens, const at::Tensor& h, const at::Tensor& c) {
  const int64_t B = h.size(1);
  auto logits = at::empty({B, p.vocab()}, h.options());
  auto h_new = at::empty_like(h);
  auto c_new = p.cell == LSTM ? at::empty_like(c) : at::empty({0}, h.options());
  {
    pybind11::gil_scoped_release no_gil;  // threads sharing one model step in parallel
    advance(p, B, tokens.data_ptr<int64_t>(), h.data_ptr<float>(), p.cell == LSTM ? c.data_ptr<float>() : nullptr,
            h_new.data_ptr<float>(), p.cell == LSTM ? c_new.data_ptr<float>() : nullptr, logits.data_ptr<float>());
  }
  return {logits, h_new, c_new};
}

// K characters for B streams, from the logits and state before the first of them:
// token k is drawn with uniforms[k] from the logits before it, then fed. Returns
// [tokens (K, B), logits (K, B, V), h (K, L, B, H), c (K, L, B, H) or empty]: entry k is
// the state right after token k, so a caller can stop at any of them.
std::vector<at::Tensor> sample(const Packed& p, const at::Tensor& logits, const at::Tensor& h, const at::Tensor& c,
                               const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p) {
  const int64_t K = uniforms.size(0), B = h.size(1), V = p.vocab(), HS = h.numel();
  const bool lstm = p.cell == LSTM;
  auto tokens = at::empty({K, B}, uniforms.options().dtype(at::kLong));
  auto logits_seq = at::empty({K, B, V}, h.options());
  auto h_seq = hidden_like(h, K);
  auto c_seq = lstm ? hidden_like(c, K) : at::empty({0}, h.options());
  {
    pybind11::gil_scoped_release no_gil;
    const double* u = uniforms.data_ptr<double>();
    int64_t* tok = tokens.data_ptr<int64_t>();
    float *ls = logits_seq.data_ptr<float>(), *hs = h_seq.data_ptr<float>(), *cs = lstm ? c_seq.data_ptr<float>() : nullptr;
    std::vector<double> prob;
    std::vector<int64_t> order;
    for (int64_t k = 0; k < K; ++k) {
      const float* prev_logits = k ? ls + (k - 1) * B * V : logits.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        tok[k * B + b] = pick_row(prev_logits + b * V, V, u[k * B + b], temperature, top_k, top_p, prob, order);
      const float* h_old = k ? hs + (k - 1) * HS : h.data_ptr<float>();
      const float* c_old = lstm ? (k ? cs + (k - 1) * HS : c.data_ptr<float>()) : nullptr;
      advance(p, B, tok + k * B, h_old, c_old, hs + k * HS, lstm ? cs + k * HS : nullptr, ls + k * B * V);
    }
  }
  return {tokens, logits_seq, h_seq, c_seq};
}

// The picks of pick_row for each row of logits (B, V), one uniform each.
at::Tensor pick(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                double top_p) {
  const int64_t B = logits.size(0), V = logits.size(1);
  auto picked = at::empty({B}, logits.options().dtype(at::kLong));
  const float* l = logits.data_ptr<float>();
  const double* u = uniforms.data_ptr<double>();
  int64_t* out = picked.data_ptr<int64_t>();
  pybind11::gil_scoped_release no_gil;
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<double> prob;
    std::vector<int64_t> order;
    for (int64_t b = b0; b < b1; ++b) out[b] = pick_row(l + b * V, V, u[b], temperature, top_k, top_p, prob, order);
  });
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
void cell(int64_t kind, const at::Tensor& gx, const at::Tensor& gh, const at::Tensor& h, const at::Tensor& c,
          int64_t layer, at::Tensor& h_out, at::Tensor& c_out, const at::Tensor& tokens, at::Tensor& x_next) {
  const int64_t B = h.size(1), H = h.size(2), at0 = layer * B * H;
  const bool lstm = kind == LSTM;
  const int64_t* tok = tokens.numel() ? tokens.data_ptr<int64_t>() : nullptr;
  const float *ph = h.data_ptr<float>() + at0, *pc = lstm ? c.data_ptr<float>() + at0 : nullptr;
  float *qh = h_out.data_ptr<float>() + at0, *qc = lstm ? c_out.data_ptr<float>() + at0 : nullptr;
  at::BFloat16* xn = x_next.numel() ? x_next.data_ptr<at::BFloat16>() : nullptr;
  pybind11::gil_scoped_release no_gil;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> bx, by;
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = float_row(gx, tok ? tok[b] : b, bx);
      cell_update(kind, H, x, float_row(gh, b, by), ph + b * H, lstm ? pc + b * H : nullptr, qh + b * H,
                  lstm ? qc + b * H : nullptr);
      if (xn)
        for (int64_t i = 0; i < H; ++i) xn[b * H + i] = static_cast<at::BFloat16>(qh[b * H + i]);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Packed>(m, "Packed")
      .def(pybind11::init<int64_t, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>());
  m.def("step", &step, "one fused step for B streams");
  m.def("sample", &sample, "K sampled steps for B streams");
  m.def("pick", &pick, "one pick per row of logits");
  m.def("cell", &cell, "one layer's cell for a batch, from its gate products");
}
