/// \file attention/polynomial_attention.hpp
/// Almost-linear-time softmax attention by the polynomial method (Alman & Song 2023).
///
/// With \f$p \approx \exp\f$ on \f$[-R, R]\f$ and features \f$U_1 = \varphi_Q(Q)\f$, \f$U_2 = \varphi_K(K)\f$
/// (feature_map.hpp), \f$\tilde A = U_1 U_2^\top \approx \exp(c\,QK^\top)\f$ and
/// \f[ \tilde O = \tilde D^{-1} U_1 (U_2^\top V), \qquad \tilde D = \mathrm{diag}(U_1 (U_2^\top \mathbf 1)), \f]
/// in \f$O(n r d)\f$ time for \f$r\f$ features. Numerator and normaliser come out of one product with
/// \f$[V, \mathbf 1]\f$. Features are generated in batches of \f$B\f$ rows (about 256 KiB of them, so a
/// batch stays in L2), so beyond inputs and output the memory is \f$O(B (r + d) + r d)\f$, kept between
/// calls; the \f$n \times r\f$ factors are never stored.
///
/// **Causal mask.** Chunk \f$k\f$ of \f$b\f$ queries (default 64) sees all earlier chunks through a running
/// state \f$Z = \sum_{\text{earlier}} U_2^\top [V, \mathbf 1]\f$ (an \f$r \times (d+1)\f$ prefix sum) and its own
/// chunk through the masked \f$b\times b\f$ block. Inside the block \f$\varphi_Q(q)^\top\varphi_K(k) = p(c\,q^\top k)\f$
/// exactly, so the block is evaluated as \f$p(c\,Q_b K_b^\top)\f$ at \f$O(b^2 d)\f$ instead of \f$O(b^2 r)\f$.
/// Features are still generated for a batch of several chunks at once. Cost \f$O(n r d + n b d)\f$, memory
/// \f$O(B (r + d) + b^2 + r d)\f$.
///
/// **Certificate.** Let \f$R = c \max_i\|q_i\|\max_j\|k_j\|\f$, so every score lies in \f$[-R, R]\f$, and let
/// \f$\varepsilon = \max_{|x|\le R}|p(x)e^{-x} - 1|\f$ (certify_exp()). Then \f$\tilde A_{ij} = A_{ij}(1+\delta_{ij})\f$
/// with \f$|\delta_{ij}|\le\varepsilon\f$, and for \f$\varepsilon < 1\f$
/// \f[ \frac{\tilde P_{ij}}{P_{ij}} = \frac{1+\delta_{ij}}{\sum_l P_{il}(1+\delta_{il})}
///     \in \Big[\frac{1-\varepsilon}{1+\varepsilon}, \frac{1+\varepsilon}{1-\varepsilon}\Big]
///     \;\Rightarrow\; |\tilde P_{ij} - P_{ij}| \le \frac{2\varepsilon}{1-\varepsilon} P_{ij}, \f]
/// hence \f$\|\tilde o_i - o_i\|_\infty \le \sum_j |\tilde P_{ij} - P_{ij}|\,\|v_j\|_\infty
/// \le \frac{2\varepsilon}{1-\varepsilon}\max_j \|v_j\|_\infty\f$. The same holds under the causal mask
/// (the sums run over \f$j \le i\f$) and per head. The bound is vacuous once \f$\varepsilon \ge 1\f$,
/// which happens already at \f$g = 2\f$ for \f$R \approx 3\f$; the a-posteriori estimate (exact attention on
/// a seeded sample of query rows) is then the useful figure.
///
/// **Exact near field** (PolynomialAttentionOptions::exact_window = w > 0). The pairs within w positions of the
/// diagonal (causal \f$0 \le i-j < w\f$, non-causal \f$|i-j| < w\f$) are weighted by \f$e^{s_{ij}}\f$ itself, all
/// others by \f$p(s_{ij})\f$, under one normaliser; the kernel evaluates the window directly next to the causal
/// block it evaluates anyway, shifted per row so that no score overflows (polynomial_kernel.hpp). For the
/// certificate the window's pairs are exact: \f$\delta_{ij} = 0\f$ there, so the argument above needs
/// \f$|\delta_{ij}| \le \varepsilon\f$ on the far pairs only, and \f$\varepsilon\f$ is certified on their radius
/// \f$R_{\text{far}} = c\max_{(i,j)\ \text{far}}\|q_i\|\|k_j\| \le R\f$ (Certificate::far_radius, measured in
/// \f$O(nd)\f$ by running maxima of the key norms). The bound stays \f$\frac{2\varepsilon}{1-\varepsilon}
/// \max_j\|v_j\|_\infty\f$: it is not scaled by the far share of each row's weight, which is unknown a priori. The
/// range policy and a minimax fit use \f$R_{\text{far}}\f$ too. The sampled estimate compares with exact attention,
/// so it measures the whole error, window included.
///
/// **Sequence parallel.** With set_state_exchange() every rank (process) passes its own contiguous shard of
/// the rows of Q, K, V (uneven or empty shards are fine) and receives its rows of \f$\tilde O\f$: the key state
/// \f$Z\f$ is a sum over keys, so the ranks add their partial states (all of them without the mask; under the
/// mask each rank's scan starts from the sum over the ranks before it). The score radius \f$R\f$ and
/// \f$\max_j\|v_j\|_\infty\f$ are taken over all ranks, so every rank uses the same polynomial and returns the
/// certificate of the whole sequence. The ranks must agree on the options and head shapes; this is checked
/// collectively before the first exchange, and any error on one rank makes every rank throw (never a rank
/// waiting forever). The a-posteriori estimate (estimate_error) needs every key on one rank and is refused.
///
/// \code
///   polyattn::PolynomialAttentionOptions opt;
///   opt.attention.causal = true;
///   opt.degree = 4;
///   opt.estimate_error = true;
///   polyattn::PolynomialAttention<float> attn(opt);
///   polyattn::Matrix<float> O(n, V.cols());
///   polyattn::Certificate cert = attn.forward(Q, K, V, O);
///   // cert.output_bound bounds every |O - O_exact| entry unless cert.vacuous();
///   // cert.sampled_max_error is the measured relative row error on 32 sampled rows.
///
///   // sequence parallel, on every rank of MPI_COMM_WORLD (parallel/distributed.hpp):
///   polyattn::PolynomialAttention<float> shard_attention(options_without_estimate);
///   shard_attention.set_state_exchange(std::make_shared<polyattn::MpiStateExchange>(MPI_COMM_WORLD));
///   shard_attention.forward(Q_rows, K_rows, V_rows, O_rows);  // this rank's rows of the sequence
/// \endcode
#pragma once

#include "certificate.hpp"
#include "exact_attention.hpp"
#include "feature_map.hpp"
#include "polynomial.hpp"
#include "polynomial_kernel.hpp"
#include "../parallel/state_exchange.hpp"

#include <algorithm>
#include <cstddef>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <vector>

namespace polyattn {

/// What happens when the measured score radius \f$R\f$ exceeds the interval the polynomial was chosen for.
enum class RangePolicy {
  raise_degree,  ///< pick the smallest degree with the same certified error on \f$[-R, R]\f$
  throw_error,   ///< throw std::domain_error
  mark_invalid,  ///< compute anyway; the certificate says `valid = false`
};

/// How the polynomial methods (PolynomialAttention, PaperBackend, AdjointBackend) approximate exp: the polynomial,
/// its feature map, blocking, memory and the optional exact near field; everything but the attention itself
/// (scale, mask, heads: AttentionOptions). Layers hold it beside their own heads, mask and scale
/// (SelfAttentionOptions::approximation, GPTConfig::approximation), so that every setting has exactly one place.
struct ApproximationOptions {
  /// Taylor truncation (default) or a relative-error minimax fit on \f$[-\text{radius},\text{radius}]\f$.
  PolynomialKind kind = PolynomialKind::taylor;
  /// Degree g of p; even by default because even Taylor truncations are positive on the whole line. It is used
  /// as given, except under RangePolicy::raise_degree, which may raise it (Certificate::degree reports the one
  /// used); choose mark_invalid or throw_error to pin it.
  int degree = 2;
  /// Interval \f$[-\text{radius},\text{radius}]\f$ the polynomial is chosen for. 0 (default): the measured
  /// \f$R\f$ of each call (the certificate is then always valid, though possibly vacuous).
  double radius = 0;
  /// Applies only when radius > 0 and the measured \f$R\f$ exceeds it.
  RangePolicy range_policy = RangePolicy::mark_invalid;
  /// Symmetric monomials (width \f$\binom{d+g}{g}\f$) or the authors' Kronecker powers (\f$\sum_t d^t\f$).
  FeatureMapKind feature_map = FeatureMapKind::symmetric;
  /// Rows per block: the feature block \f$B\f$ when non-causal, the scan chunk \f$b\f$ (masked block) when
  /// causal, for every polynomial method (chunked_scan.hpp). 0 (default): about 512 KiB of features per block
  /// (the paper method's non-causal passes: 256 rows); \f$b = 64\f$. Blocks are also the unit of work of
  /// polyattn's threads (polynomial_kernel.hpp); results do not depend on the thread count.
  Index chunk_size = 0;
  /// Causal: memory for the states of a window of scan chunks, \f$r(d_v+1)\f$ numbers per chunk, that one pass
  /// writes and the next reads (at least one chunk). 0 (default): automatic, 128 KiB per thread (12 chunks at
  /// \f$d_v = 16\f$, \f$r = 153\f$), so that a thread's chunks, their rows, states and results, are still in its
  /// core's L2 when the next pass reads them (512 KiB made the causal adjoint 7% slower on one thread at
  /// \f$n = 2^{18}\f$, 16 MiB the causal forward 16%). Changes memory and speed, never results.
  std::size_t scan_window_bytes = 0;
  /// Causal AdjointBackend: largest memory forward() may spend on keeping the prefix state of every chunk for
  /// backward(), \f$(n/b)\,h\,r(d_v+1)\f$ numbers (default 256 MiB). Above it backward() recomputes them window
  /// by window, with bitwise the same result, at the cost of one more pass over the keys. With a state exchange
  /// and checkpoints, backward() also keeps every chunk's state gradient, about as many bytes again, so that it
  /// computes them once rather than once for the shard's total and again in the scan (5-6% of a forward+backward
  /// at 2^20 tokens on 1 and 2 ranks).
  std::size_t max_checkpoint_bytes = std::size_t(256) << 20;
  /// Largest allowed feature width r; a wider map throws std::invalid_argument naming 'degree'. Whatever its
  /// value, widths above max_feature_width (feature_map.hpp) are rejected the same way before any allocation.
  Index max_features = default_max_features;
  /// Run exact attention on `estimate_rows` sampled query rows and report their relative errors.
  bool estimate_error = false;
  /// Number m of sampled rows for the a-posteriori estimate; costs \f$O(m n d)\f$.
  Index estimate_rows = 32;
  /// Seed of the row sample.
  std::uint64_t seed = 20240826;
  /// Exact near field: width \f$w \ge 0\f$ in tokens; 0 (default) is off and leaves every result bitwise as
  /// without the option. Pair \f$(i, j)\f$ is *near* when \f$0 \le i - j < w\f$ (causal: the w most recent keys,
  /// the query's own included) or \f$|i - j| < w\f$ (non-causal: the same distance on both sides, \f$2w - 1\f$
  /// keys); near scores use \f$\exp\f$ itself, every other (far) pair the polynomial, under one normaliser:
  /// \f[ \tilde o_i = \frac{\sum_{j\,\text{near}} e^{s_{ij}}v_j + \sum_{j\,\text{far}} p(s_{ij})v_j}
  ///                        {\sum_{j\,\text{near}} e^{s_{ij}} + \sum_{j\,\text{far}} p(s_{ij})},
  ///     \qquad s_{ij} = c\,q_i^\top k_j. \f]
  /// Attention in trained models concentrates near the diagonal, where the largest scores are; there exp is
  /// exact. Each row is shifted by its largest near score (or the log of its far normaliser, when larger), so no
  /// score radius overflows exp (polynomial_kernel.hpp). AdjointBackend differentiates this function exactly.
  /// The certificate then covers the far pairs only (Certificate::far_radius). Extra cost \f$O(n(w + b)d)\f$ for
  /// the chunk or tile size b (64). Needs as many queries as keys; not available with a state exchange (a window
  /// across a shard boundary would need the neighbouring rank's keys) nor with PaperBackend, whose gradient
  /// evaluates p on every pair.
  Index exact_window = 0;

  /// Throws std::invalid_argument naming the offending field; `where` names the options in the message.
  void check(const char* where = "polyattn::ApproximationOptions") const {
    detail::require(degree >= 0, where, "'degree' must be >= 0, got ", degree);
    detail::require(std::isfinite(radius) && radius >= 0, where, "'radius' must be finite and >= 0, got ", radius);
    detail::require(chunk_size >= 0, where, "'chunk_size' must be >= 0 (0 = automatic), got ", chunk_size);
    detail::require(max_features >= 1, where, "'max_features' must be >= 1, got ", max_features);
    detail::require(estimate_rows >= 1, where, "'estimate_rows' must be >= 1, got ", estimate_rows);
    detail::require(exact_window >= 0, where, "'exact_window' must be >= 0 (0 = off), got ", exact_window);
    detail::require(range_policy != RangePolicy::raise_degree || radius > 0, where,
                    "'range_policy' raise_degree needs a 'radius' > 0 to define the target error");
  }
};

/// Parameters of PolynomialAttention and of the polynomial backends: the attention (scale, mask, heads) and how it
/// is approximated (the inherited ApproximationOptions fields: `options.degree`, `options.exact_window`, ...).
struct PolynomialAttentionOptions : ApproximationOptions {
  /// Scale, mask and heads (options.hpp).
  AttentionOptions attention;

  PolynomialAttentionOptions() = default;
  /// `scale_mask_heads` approximated as `approximation` says.
  PolynomialAttentionOptions(const AttentionOptions& scale_mask_heads, const ApproximationOptions& approximation)
      : ApproximationOptions(approximation), attention(scale_mask_heads) {}

  /// Throws std::invalid_argument naming the offending field.
  void check() const {
    attention.check();
    ApproximationOptions::check("polyattn::PolynomialAttentionOptions");
  }
};

namespace detail {

/// `count` distinct indices of [0, n), ascending (all of them when count >= n); Floyd's sampling.
inline std::vector<Index> sample_rows(Index n, Index count, std::uint64_t seed) {
  std::vector<Index> rows;
  if (count >= n) {
    for (Index i = 0; i < n; ++i) rows.push_back(i);
    return rows;
  }
  std::mt19937_64 rng(seed);
  for (Index j = n - count; j < n; ++j) {
    const Index t = std::uniform_int_distribution<Index>(0, j)(rng);
    rows.push_back(std::find(rows.begin(), rows.end(), t) == rows.end() ? t : j);
  }
  std::sort(rows.begin(), rows.end());
  return rows;
}

/// The interval, polynomial and error statement one call uses: the policy applied to a measured R.
struct PolynomialChoice {
  Polynomial poly;
  Certificate cert;
};

/// The a-priori bound \f$\frac{2\varepsilon}{1-\varepsilon}\max_j\|v_j\|_\infty\f$ on every entry of
/// \f$\tilde O - O\f$ (see Certificate::output_bound); \f$+\infty\f$ once \f$\varepsilon \ge 1\f$.
inline double apriori_output_bound(double poly_error, double max_abs_value) {
  return poly_error < 1 ? 2 * poly_error / (1 - poly_error) * max_abs_value : std::numeric_limits<double>::infinity();
}

/// Applies the options' range policy to the measured score radius of the pairs the polynomial evaluates:
/// `far_radius`, which is `measured_radius` (all pairs) without an exact window. `where` names the caller in its
/// errors. Throws std::domain_error when the radius is not finite (the inputs' scores overflow double), when it
/// exceeds the configured interval under RangePolicy::throw_error, or when no degree up to 64 reaches the
/// configured error on it under RangePolicy::raise_degree.
inline PolynomialChoice choose_polynomial(const char* where, const PolynomialAttentionOptions& opt,
                                          double measured_radius, double far_radius) {
  if (!std::isfinite(measured_radius))
    throw std::domain_error(concat(where, ": the score radius R = c max|q| max|k| of the inputs 'Q', 'K' is ",
                                   measured_radius, " (it overflows double): scale Q and K down"));
  PolynomialChoice choice;
  Certificate& cert = choice.cert;
  cert.radius = measured_radius;
  cert.exact_window = opt.exact_window;
  cert.far_radius = far_radius;
  cert.degree = opt.degree;
  cert.interval = opt.radius > 0 ? opt.radius : far_radius;
  const char* pairs = opt.exact_window > 0 ? " over the pairs outside the exact window" : "";
  if (opt.radius > 0 && far_radius > opt.radius) {
    switch (opt.range_policy) {
      case RangePolicy::throw_error:
        throw std::domain_error(concat(where, ": measured score radius R = ", far_radius, " of the inputs 'Q', 'K'",
                                       pairs, " exceeds 'radius' = ", opt.radius, " that the degree-", opt.degree,
                                       " polynomial covers (RangePolicy::throw_error)"));
      case RangePolicy::mark_invalid:
        cert.valid = false;
        break;
      case RangePolicy::raise_degree: {
        const double configured =
            certify_exp(exp_polynomial(opt.kind, opt.degree, opt.radius), opt.radius).relative_error;
        const double target = std::min(configured, 0.5);
        const bool even_only = opt.kind == PolynomialKind::taylor && opt.degree % 2 == 0;
        constexpr int max_degree = 64;
        int degree = 0;
        try {
          degree = select_degree(far_radius, target, opt.kind, even_only, max_degree);
        } catch (const std::domain_error&) {
          throw std::domain_error(concat(where, ": measured score radius R = ", far_radius, " of the inputs 'Q', 'K'",
                                         pairs, " exceeds 'radius' = ", opt.radius,
                                         " and no degree <= ", max_degree, " reaches the configured relative error ",
                                         target, " on [-R, R] (RangePolicy::raise_degree): scale Q and K down"));
        }
        cert.degree = std::max(opt.degree, degree);
        cert.interval = far_radius;
        break;
      }
    }
  }
  choice.poly = exp_polynomial(opt.kind, cert.degree, std::max(cert.interval, 1e-300));
  const ExpApproximationCertificate exp_cert = certify_exp(choice.poly, cert.interval);
  cert.poly_error = exp_cert.relative_error;
  cert.positive = exp_cert.positive;
  return choice;
}

/// Why the approximate output of finite inputs is not finite although every normaliser is: the numerators
/// (features times values) overflowed. O(n d).
template <class T, class DV>
std::string polynomial_overflow_cause(const Eigen::MatrixBase<DV>& V, int degree, double radius) {
  return concat("the features times the values overflowed ", sizeof(T) == sizeof(float) ? "float" : "double",
                " (largest ", static_cast<double>(std::numeric_limits<T>::max()), "): degree ", degree,
                ", score radius R = ", radius, ", max |V| = ", static_cast<double>(V.cwiseAbs().maxCoeff()),
                "; scale V (or Q and K) down");
}

/// A new FeatureMap for the options; its errors (a feature width beyond 'max_features' or beyond what can be
/// allocated) are reported as `where`.
template <class T>
std::unique_ptr<FeatureMap<T>> make_feature_map(const char* where, const PolynomialAttentionOptions& opt, Index dk,
                                                const Polynomial& poly, double c) {
  try {
    return std::make_unique<FeatureMap<T>>(opt.feature_map, dk, poly, c, opt.max_features);
  } catch (const std::invalid_argument& error) {
    throw std::invalid_argument(concat(where, ": ", error.what()));
  }
}

/// The a-posteriori estimate: exact attention on `options.estimate_rows` seeded random query rows and the
/// maximum and mean relative row error of the approximate output `O` on them, written into `cert`.
template <class T>
void estimate_sampled_error(ExactAttention<T>& exact, const PolynomialAttentionOptions& options,
                            const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                            const ConstMatrixRef<T>& O, Certificate& cert) {
  const std::vector<Index> rows = sample_rows(Q.rows(), options.estimate_rows, options.seed);
  const auto m = static_cast<Index>(rows.size());
  Matrix<T> sampled_queries(m, Q.cols()), exact_rows(m, V.cols());
  for (Index i = 0; i < m; ++i) sampled_queries.row(i) = Q.row(rows[static_cast<std::size_t>(i)]);
  exact.forward_rows(sampled_queries, rows, K, V, exact_rows);
  double max_error = 0, sum_error = 0;
  for (Index i = 0; i < m; ++i) {
    const auto approx = O.row(rows[static_cast<std::size_t>(i)]).template cast<double>();
    const auto exact_row = exact_rows.row(i).template cast<double>();
    const double error = (approx - exact_row).norm() / std::max(exact_row.norm(), std::numeric_limits<double>::min());
    max_error = std::max(max_error, error);
    sum_error += error;
  }
  cert.sampled_rows = m;
  cert.sampled_max_error = max_error;
  cert.sampled_mean_error = sum_error / static_cast<double>(m);
}

/// The score radius over the far pairs of an exact window of width `window` >= 1
/// (PolynomialAttentionOptions::exact_window), the only pairs the polynomial evaluates: the maximum over heads of
/// \f$c\max_{(i,j)\ \text{far}}\|q_i\|\|k_j\|\f$, in double; 0 when no pair is far. O(n d) by running maxima of the
/// key norms from the start (and, non-causal, from the end). Needs as many queries as keys.
template <class DQ, class DK>
double far_score_radius(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const HeadShape& shape,
                        double scale, Index window, bool causal) {
  const Index n = shape.n;
  // Squared row norms in double, a column at a time (vectorised); then the largest squared key norm over keys
  // [0, t] and [t, n).
  Eigen::ArrayXd queries(n), up_to(n), from(n);
  const auto squared_norms = [](const auto& X, Eigen::ArrayXd& out) {
    out = X.col(0).template cast<double>().array().square();
    for (Index j = 1; j < X.cols(); ++j) out += X.col(j).template cast<double>().array().square();
  };
  double radius = 0;
  for (Index h = 0; h < shape.heads; ++h) {
    squared_norms(Q.middleCols(h * shape.dk, shape.dk), queries);
    squared_norms(K.middleCols(h * shape.dk, shape.dk), from);
    up_to = from;
    for (Index t = 1; t < n; ++t) up_to(t) = std::max(up_to(t), up_to(t - 1));
    for (Index t = n - 2; t >= 0; --t) from(t) = std::max(from(t), from(t + 1));
    double largest = 0;  // largest |q_i|^2 |k_j|^2 over the far pairs
    for (Index i = window; i < n; ++i) largest = std::max(largest, queries(i) * up_to(i - window));
    if (!causal)
      for (Index i = 0; i + window < n; ++i) largest = std::max(largest, queries(i) * from(i + window));
    radius = std::max(radius, scale * std::sqrt(largest));
  }
  return radius;
}

}  // namespace detail

template <class T>
class AdjointBackend;
template <class T>
class PaperBackend;

/// Approximate attention forward pass by the polynomial method, on polyattn's threads (the shared
/// detail::PolynomialKernel; whole heads concurrently when the thread count divides their number,
/// detail::head_threads()); keeps its workspaces between calls. See the file documentation for the algorithm,
/// the causal scan and the certificate.
template <class T>
class PolynomialAttention {
 public:
  explicit PolynomialAttention(PolynomialAttentionOptions options = {})
      : options_(std::move(options)), exact_(options_.attention) {
    detail::static_check_scalar<T>();
    options_.check();
  }

  const PolynomialAttentionOptions& options() const { return options_; }

  /// Makes the next calls sequence parallel (see the file documentation): Q, K, V and O are this rank's rows, and
  /// every rank of `exchange` must make the same calls with the same options. Null (the default) restores the
  /// serial pass, whose results are bitwise those of a PolynomialAttention that never had an exchange.
  void set_state_exchange(std::shared_ptr<StateExchange> exchange) { exchange_ = std::move(exchange); }
  /// The exchange set by set_state_exchange() (null: serial).
  StateExchange* state_exchange() const { return exchange_.get(); }

  /// Writes \f$\tilde O\f$ (n x h d_v) and returns its certificate.
  /// Throws std::invalid_argument for bad shapes, non-finite input or `O` sharing memory with Q, K or V;
  /// std::domain_error when the measured radius exceeds the interval under RangePolicy::throw_error (or no
  /// degree reaches it under raise_degree), when an approximate normaliser is not positive (p not positive on
  /// the scores: use an even degree) or when finite input overflows T (features, normalisers or output). With a
  /// state exchange, also std::invalid_argument when the ranks' options or head shapes differ, when
  /// estimate_error is set or when every shard is empty; an error on one rank makes every rank throw.
  Certificate forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                      MatrixRef<T> O);
  /// The same on row-major matrices, read and written in place: the result is bitwise that of the column-major
  /// call (attention/head_rows.hpp).
  Certificate forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K, const ConstRowMajorRef<T>& V,
                      RowMajorRef<T> O);

  /// Feature map of the last call (valid after forward()).
  const FeatureMap<T>& feature_map() const {
    detail::require(map_ != nullptr, "polyattn::PolynomialAttention::feature_map", "call forward() first");
    return *map_;
  }

 private:
  // The backends built on this forward pass: they report errors under their own names, and the adjoint keeps
  // what its backward pass needs.
  friend class AdjointBackend<T>;
  friend class PaperBackend<T>;

  // What AdjointBackend keeps of a forward pass for its backward pass.
  struct Saved {
    Matrix<T> normalisers;      // n x h (with an exact window the shifted ones)
    Matrix<T> shifts;           // with an exact window, the row shifts m_i (n x h); otherwise no rows
    Matrix<T> states;           // Z^T per head ((d_v+1) x hr); causal: Z^{<s}^T per head and chunk, or no columns
    Matrix<T> incoming_states;  // causal: per head, the earlier ranks' key state Z^T ((d_v+1) x hr), zero serially
    bool checkpointed = false;
  };

  // What forward() measured of its inputs: the head shape, the scale, and (over all ranks with an exchange) the
  // score radius and max |V|.
  struct Measured {
    detail::HeadShape shape;
    double scale, radius, max_abs_value;
    double far_radius;  // the radius over the pairs outside the exact window (= radius without one)
  };

  // forward() reporting errors as `where`, on column-major (ConstMatrixRef, MatrixRef) or row-major
  // (ConstRowMajorRef, RowMajorRef) matrices; with `saved`, also keeps what the adjoint's backward needs (the
  // causal prefix states only within options().max_checkpoint_bytes).
  template <class In, class Out>
  Certificate forward(const In& Q, const In& K, const In& V, Out& O, const char* where, Saved* saved);

  // The part of forward() after the measurements: the kernel over the heads and the certificate. With
  // `measure_inputs` (only when measures_in_kernel()), `measured` holds the shape and scale only: the kernel takes
  // R and max |V| from the blocks it reads, and the result is empty when any input or output is not finite or the
  // kernel threw, so that forward() redoes the call on the checked path, which reports the cause.
  template <class In, class Out>
  std::optional<Certificate> compute(const In& Q, const In& K, const In& V, Out& O, const char* where, Saved* saved,
                                     const Measured& measured, bool measure_inputs);
  // Whether the kernel can measure the inputs for the certificate: serially, without an exact window (whose far
  // radius needs every row's norm), and with a polynomial that does not depend on R (Taylor, no 'radius').
  bool measures_in_kernel() const {
    return !exchange_ && options_.exact_window == 0 && options_.kind == PolynomialKind::taylor &&
           options_.radius == 0;
  }

  // The serial checks of forward() that read no entries; they return the head shape.
  template <class In, class Out>
  detail::HeadShape check_shapes(const char* where, const In& Q, const In& K, const In& V, const Out& O) const;
  // The serial checks and measurements of forward().
  template <class In, class Out>
  Measured measure(const char* where, const In& Q, const In& K, const In& V, const Out& O) const;
  // The same for one rank's shard: local validation, exchange_->agree() on shard_settings(), then the radius and
  // max |V| over all ranks. Every rank returns or every rank throws.
  template <class In, class Out>
  Measured measure_shard(const char* where, const In& Q, const In& K, const In& V, const Out& O) const;
  // The values every rank must share for the head shape `shape` (AdjointBackend's backward checks them too).
  std::vector<StateExchange::Setting> shard_settings(const detail::HeadShape& shape) const;

  // Applies the range policy and (re)builds the feature map when degree, interval or shape changed.
  Certificate prepare(const char* where, Index dk, double c, double radius, double far_radius) {
    detail::PolynomialChoice choice = detail::choose_polynomial(where, options_, radius, far_radius);
    if (!map_ || map_->dim() != dk || map_->scale() != c || map_poly_.coeffs != choice.poly.coeffs) {
      map_ = detail::make_feature_map<T>(where, options_, dk, choice.poly, c);
      map_poly_ = choice.poly;
    }
    choice.cert.features = map_->width();
    return choice.cert;
  }

  // What the kernel found in one head's call: whether the results were finite (checked block by block) and, with
  // measure_inputs, the statistics it took of the head's inputs.
  struct HeadReport {
    bool finite = true;
    typename detail::PolynomialKernel<T>::InputStatistics inputs;
  };

  // Calls body(h, kernel) for every head h with a kernel configured as kernels_.front() and returns each head's
  // report: concurrently, one head per thread with the thread's own kernel, when detail::head_threads() allows it
  // and the call's `work` (multiply-adds) is worth a team; else one head after another, each running its own loops
  // on all threads. A head's results do not depend on which (a kernel's partitions do not depend on the thread
  // count), so they are bitwise the same. With an exchange the heads always run in order, since every rank must
  // exchange their states in the same order.
  template <class Body>
  std::vector<HeadReport> for_each_head(Index heads, double work, const Body& body) {
    const int threads = exchange_ ? 1 : detail::head_threads(heads);
    if (kernels_.size() < static_cast<std::size_t>(threads)) kernels_.resize(static_cast<std::size_t>(threads));
    for (int t = 1; t < threads; ++t) kernels_[static_cast<std::size_t>(t)].configure_as(kernels_.front());
    std::vector<HeadReport> reports(static_cast<std::size_t>(heads));
    const auto run = [&](Index h, detail::PolynomialKernel<T>& kernel) {
      body(h, kernel);
      reports[static_cast<std::size_t>(h)] = {kernel.results_finite(), kernel.input_statistics()};
    };
    if (threads <= 1)
      for (Index h = 0; h < heads; ++h) run(h, kernels_.front());
    else
      detail::parallel_for(heads, [&](Index h, int thread) { run(h, kernels_[static_cast<std::size_t>(thread)]); },
                           work);
    return reports;
  }
  static bool all_heads_finite(const std::vector<HeadReport>& reports) {
    return std::all_of(reports.begin(), reports.end(), [](const HeadReport& r) { return r.finite; });
  }

  PolynomialAttentionOptions options_;
  ExactAttention<T> exact_;
  std::unique_ptr<FeatureMap<T>> map_;
  Polynomial map_poly_;
  // for_each_head()'s kernels: the first, configured by compute(), and one more per further thread that runs heads.
  std::vector<detail::PolynomialKernel<T>> kernels_ = std::vector<detail::PolynomialKernel<T>>(1);
  Saved unsaved_;  // the normalisers and non-causal states of a forward() that keeps nothing
  std::shared_ptr<StateExchange> exchange_;
};

// Out of the class body so that they are not inline: code that includes extern_templates.hpp then calls the
// compiled instantiation instead of instantiating the kernel again.
template <class T>
Certificate PolynomialAttention<T>::forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                                            const ConstMatrixRef<T>& V, MatrixRef<T> O) {
  return forward(Q, K, V, O, "polyattn::PolynomialAttention::forward", nullptr);
}

template <class T>
Certificate PolynomialAttention<T>::forward(const ConstRowMajorRef<T>& Q, const ConstRowMajorRef<T>& K,
                                            const ConstRowMajorRef<T>& V, RowMajorRef<T> O) {
  return forward(Q, K, V, O, "polyattn::PolynomialAttention::forward", nullptr);
}

template <class T>
template <class In, class Out>
detail::HeadShape PolynomialAttention<T>::check_shapes(const char* where, const In& Q, const In& K, const In& V,
                                                       const Out& O) const {
  const auto shape = detail::check_qkv_shapes(where, Q, K, V, options_.attention);
  detail::check_forward_output(where, shape, Q, K, V, O);
  const Index window = options_.exact_window;
  detail::require(window == 0 || shape.n == shape.m, where, "'exact_window' = ", window,
                  " needs as many queries as keys (query i and key i are one position), got 'Q' with ", shape.n,
                  " rows and 'K' with ", shape.m);
  return shape;
}

template <class T>
template <class In, class Out>
auto PolynomialAttention<T>::measure(const char* where, const In& Q, const In& K, const In& V, const Out& O) const
    -> Measured {
  const detail::HeadShape shape = check_shapes(where, Q, K, V, O);
  const Index window = options_.exact_window;
  // The passes that measure R and max|v| for the certificate also detect non-finite entries (they make the
  // result NaN or infinite); only then are the entries searched for the error message.
  const double c = options_.attention.resolved_scale(shape.dk);
  const double radius = detail::score_radius(Q, K, shape, c);
  if (!std::isfinite(radius)) {
    detail::require_finite(where, "Q", Q);
    detail::require_finite(where, "K", K);
  }
  const double max_v = detail::max_abs(V);
  if (!std::isfinite(max_v)) detail::require_finite(where, "V", V);
  const double far_radius =
      window > 0 && std::isfinite(radius)
          ? std::min(radius, detail::far_score_radius(Q, K, shape, c, window, options_.attention.causal))
          : radius;
  return {shape, c, radius, max_v, far_radius};
}

template <class T>
std::vector<StateExchange::Setting> PolynomialAttention<T>::shard_settings(const detail::HeadShape& shape) const {
  const PolynomialAttentionOptions& o = options_;
  return {{"heads", static_cast<double>(shape.heads)},
          {"head dimension d_k (columns of Q and K per head)", static_cast<double>(shape.dk)},
          {"head dimension d_v (columns of V per head)", static_cast<double>(shape.dv)},
          {"causal", o.attention.causal ? 1.0 : 0.0},
          {"scale", o.attention.resolved_scale(shape.dk)},
          {"kind", static_cast<double>(o.kind)},
          {"degree", static_cast<double>(o.degree)},
          {"radius", o.radius},
          {"range_policy", static_cast<double>(o.range_policy)},
          {"feature_map", static_cast<double>(o.feature_map)},
          {"max_features", static_cast<double>(o.max_features)},
          {"chunk_size", static_cast<double>(o.chunk_size)}};
}

template <class T>
template <class In, class Out>
auto PolynomialAttention<T>::measure_shard(const char* where, const In& Q, const In& K, const In& V,
                                           const Out& O) const -> Measured {
  Measured measured{};
  std::vector<double> maxima;  // per head max |q_i| and max |k_j|, then max |V|, the rows of Q and of K
  std::exception_ptr failure;  // agree() makes every rank throw it
  try {
    detail::require(!options_.estimate_error, where,
                    "'estimate_error' needs every key on one rank: it is not available with a state exchange");
    detail::require(options_.exact_window == 0, where, "'exact_window' = ", options_.exact_window,
                    " is not available with a state exchange: the window of a shard's first rows reaches into the "
                    "previous rank's keys (set it to 0)");
    measured.shape = detail::check_shard_shapes(where, Q, K, V, options_.attention);
    detail::check_forward_output(where, measured.shape, Q, K, V, O);
    detail::require_finite_in_parallel(where, "Q", Q);
    detail::require_finite_in_parallel(where, "K", K);
    detail::require_finite_in_parallel(where, "V", V);
    const detail::HeadShape& shape = measured.shape;
    for (Index h = 0; h < shape.heads; ++h) {
      maxima.push_back(detail::max_row_norm(Q.middleCols(h * shape.dk, shape.dk)));
      maxima.push_back(detail::max_row_norm(K.middleCols(h * shape.dk, shape.dk)));
    }
    maxima.push_back(detail::max_abs(V));
    maxima.push_back(static_cast<double>(Q.rows()));
    maxima.push_back(static_cast<double>(K.rows()));
  } catch (...) {
    failure = std::current_exception();
  }
  exchange_->agree(where, failure, shard_settings(measured.shape));
  exchange_->maxima_over_ranks(maxima);
  const detail::HeadShape& shape = measured.shape;
  detail::require(maxima[maxima.size() - 2] > 0 && maxima.back() > 0, where,
                  "arguments 'Q' and 'K' must have rows on at least one rank, got at most ",
                  maxima[maxima.size() - 2], " and ", maxima.back(), " rows on every one of the ",
                  exchange_->ranks(), " ranks");
  measured.scale = options_.attention.resolved_scale(shape.dk);
  // The serial score_radius(): the largest head radius, from the largest norms over all ranks.
  measured.radius = 0;
  for (Index h = 0; h < shape.heads; ++h)
    measured.radius = std::max(measured.radius, measured.scale * maxima[static_cast<std::size_t>(2 * h)] *
                                                    maxima[static_cast<std::size_t>(2 * h + 1)]);
  measured.max_abs_value = maxima[maxima.size() - 3];
  measured.far_radius = measured.radius;
  return measured;
}

template <class T>
template <class In, class Out>
Certificate PolynomialAttention<T>::forward(const In& Q, const In& K, const In& V, Out& O, const char* where,
                                            Saved* saved) {
  std::optional<Certificate> cert;
  if (measures_in_kernel()) {
    // The input passes that measure R and max |V| cost as much as a tenth of the call at n = 2^18 (they stream
    // Q, K and V from memory); the kernel takes the same maxima from the blocks it has in cache.
    const detail::HeadShape shape = check_shapes(where, Q, K, V, O);
    try {
      // R and max |V| start from 0; the kernel raises them.
      cert = compute(Q, K, V, O, where, saved, {shape, options_.attention.resolved_scale(shape.dk), 0, 0, 0}, true);
    } catch (...) {
      // Whatever failed, the checked path below fails the same way, after the input checks that name a cause.
    }
  }
  if (!cert) {
    const Measured measured = exchange_ ? measure_shard(where, Q, K, V, O) : measure(where, Q, K, V, O);
    cert = compute(Q, K, V, O, where, saved, measured, false);
  }
  if (options_.estimate_error) detail::estimate_sampled_error<T>(exact_, options_, Q, K, V, O, *cert);
  return *cert;
}

template <class T>
template <class In, class Out>
std::optional<Certificate> PolynomialAttention<T>::compute(const In& Q, const In& K, const In& V, Out& O,
                                                           const char* where, Saved* saved, const Measured& measured,
                                                           bool measure_inputs) {
  const detail::HeadShape& shape = measured.shape;
  // Measuring in the kernel, R is 0 until the kernel has run: the polynomial does not depend on it
  // (measures_in_kernel()), and the certificate is made again once R is known.
  const double radius = measured.radius;
  Certificate cert = prepare(where, shape.dk, measured.scale, radius, measured.far_radius);

  const bool causal = options_.attention.causal;
  kernels_.front().configure(*map_, map_poly_, causal, options_.chunk_size, options_.scan_window_bytes,
                             options_.exact_window, where, radius, exchange_.get());
  const Index r = map_->width(), dv = shape.dv, chunks = causal ? kernels_.front().scan_chunks(shape.n) : 1;
  Saved& keep = saved ? *saved : unsaved_;
  keep.normalisers.resize(shape.n, shape.heads);
  keep.shifts.resize(options_.exact_window > 0 ? shape.n : 0, shape.heads);
  const double checkpoint_bytes = static_cast<double>(sizeof(T)) * static_cast<double>(r) *
                                  static_cast<double>(shape.heads * chunks * (dv + 1));
  keep.checkpointed =
      !causal || (saved && checkpoint_bytes <= static_cast<double>(options_.max_checkpoint_bytes));
  keep.states.resize(dv + 1, keep.checkpointed ? shape.heads * chunks * r : 0);
  const Index state_cols = keep.checkpointed ? chunks * r : 0, incoming_cols = causal ? r : 0;
  keep.incoming_states.resize(dv + 1, shape.heads * incoming_cols);
  // With an exchange, an error on this rank (a normaliser, found after that head's exchange) is held until every
  // head has exchanged its states and then thrown on every rank by succeeded(); serially it is thrown at once.
  std::exception_ptr failure;
  const double work = static_cast<double>(shape.n) * static_cast<double>(shape.heads) * static_cast<double>(r) *
                      static_cast<double>(dv + 1);
  const std::vector<HeadReport> reports = for_each_head(shape.heads, work, [&](Index h,
                                                                               detail::PolynomialKernel<T>& kernel) {
    try {
      kernel.forward(detail::head_rows(Q.middleCols(h * shape.dk, shape.dk)),
                     detail::head_rows(K.middleCols(h * shape.dk, shape.dk)),
                     detail::head_rows(V.middleCols(h * dv, dv)), detail::head_output(O.middleCols(h * dv, dv)),
                     keep.normalisers.col(h), keep.shifts.col(h), keep.states.middleCols(h * state_cols, state_cols),
                     keep.incoming_states.middleCols(h * incoming_cols, incoming_cols), measure_inputs);
    } catch (...) {
      if (!exchange_) throw;
      if (!failure) failure = std::current_exception();
    }
  });
  const bool outputs_finite = all_heads_finite(reports);
  // With measure_inputs, R and max |V| as measure() finds them, from the kernel's statistics of each head.
  double measured_radius = 0, max_abs_value = measured.max_abs_value;
  if (measure_inputs)
    for (const HeadReport& report : reports) {
      detail::include_head_radius(measured_radius, measured.scale, std::sqrt(report.inputs.max_query_norm2),
                                  std::sqrt(report.inputs.max_key_norm2));
      max_abs_value = detail::max_keeping_nan(max_abs_value, report.inputs.max_abs_value);
    }
  if (measure_inputs) {
    if (!outputs_finite || !std::isfinite(measured_radius) || !std::isfinite(max_abs_value)) return {};
    cert = prepare(where, shape.dk, measured.scale, measured_radius, measured_radius);
  }
  if (!failure && !outputs_finite) {
    try {
      detail::require_finite_result(where, "the output", O, [&] {
        return detail::polynomial_overflow_cause<T>(V, map_poly_.degree(), radius);
      });
    } catch (...) {
      if (!exchange_) throw;
      failure = std::current_exception();
    }
  }
  if (exchange_) exchange_->succeeded(where, failure);
  cert.output_bound = detail::apriori_output_bound(cert.poly_error, max_abs_value);
  return cert;
}

}  // namespace polyattn
