/// \file attention/polynomial.hpp
/// Polynomials \f$p \approx \exp\f$ on \f$[-R, R]\f$ and a certified bound on their relative error.
///
/// - taylor_exp(): \f$\sum_{t\le g} x^t/t!\f$. Even truncations are positive on the whole real line
///   (their minimum is attained where \f$p = p' + x^g/g! = x^g/g! > 0\f$), so the approximate softmax
///   normaliser stays positive whatever the scores.
/// - minimax_exp(): the degree-\f$g\f$ polynomial minimising \f$\max_{|x|\le R}|p(x)e^{-x} - 1|\f$
///   (Remez exchange with weight \f$e^{-x}\f$). For the same degree its error is roughly \f$2^{g}\f$
///   times smaller than Taylor's, but it holds only on \f$[-R, R]\f$.
///
/// **Certificate.** certify_exp() returns a rigorous upper bound on
/// \f$\varepsilon = \max_{|x|\le R}|e(x)|\f$, \f$e(x) = p(x)e^{-x} - 1\f$, as the smaller of two bounds:
/// 1. (Taylor only) Lagrange's remainder \f$e^x - T_g(x) = e^{\xi}x^{g+1}/(g+1)!\f$ with \f$\xi\f$ between 0
///    and \f$x\f$ gives \f$|T_g(x)e^{-x} - 1| = e^{\xi - x}|x|^{g+1}/(g+1)! \le e^{R}R^{g+1}/(g+1)!\f$ for the exact
///    truncation \f$T_g\f$. The stored coefficients \f$a_t = \mathrm{fl}(1/t!)\f$ come from \f$t\f$ roundings,
///    \f$|a_t - 1/t!| \le 2tu\,a_t\f$, which adds \f$e^R\sum_t 2tu\,a_tR^t\f$ (without it the bound would
///    claim errors far below what double coefficients can represent).
/// 2. (any p) Dense evaluation on \f$N\f$ equal intervals of width \f$h\f$: on each interval \f$e\f$ differs
///    from its linear interpolant by at most \f$\tfrac{h^2}{8}\max|e''|\f$, and
///    \f$e'' = (p'' - 2p' + p)e^{-x}\f$, so \f$\max|e''| \le e^{R}\sum_t |b_t|R^t\f$ with \f$b\f$ the
///    coefficients of \f$p''-2p'+p\f$. Hence \f$\varepsilon \le \max_k |e(x_k)| + \tfrac{h^2}{8}e^R\sum_t|b_t|R^t
///    + \delta\f$, where \f$\delta = 4(g+2)\,u\,e^R\sum_t|a_t|R^t\f$ covers the rounding of the evaluation in
///    double (\f$u = 2^{-53}\f$).
/// Positivity of p on the interval follows from \f$\varepsilon < 1\f$; otherwise the same interpolation
/// argument is applied to p itself (\f$p(x) \ge \min(p(x_k), p(x_{k+1})) - \tfrac{h^2}{8}\max|p''|\f$).
///
/// \code
///   polyattn::Polynomial p = polyattn::taylor_exp(4);
///   polyattn::ExpApproximationCertificate cert = polyattn::certify_exp(p, 1.0);
///   // cert.relative_error <= 1e-2 bounds |p(x) e^{-x} - 1| on [-1, 1]; cert.positive == true
///   int g = polyattn::select_degree(2.0, 1e-6);   // smallest even Taylor degree with eps <= 1e-6 on [-2, 2]
/// \endcode
#pragma once

#include "../common.hpp"

#include <Eigen/LU>

#include <algorithm>
#include <limits>
#include <vector>

namespace polyattn {

/// How the polynomial approximating exp is chosen.
enum class PolynomialKind {
  taylor,   ///< Taylor truncation at 0; independent of the interval
  minimax,  ///< best relative-error fit on \f$[-R, R]\f$ (Remez)
};

/// \f$p(x) = \sum_{t=0}^{g} a_t x^t\f$ with `coeffs[t]` \f$= a_t\f$.
struct Polynomial {
  std::vector<double> coeffs{1.0};

  int degree() const { return static_cast<int>(coeffs.size()) - 1; }

  /// Horner evaluation.
  double operator()(double x) const {
    double value = 0;
    for (auto a = coeffs.rbegin(); a != coeffs.rend(); ++a) value = value * x + *a;
    return value;
  }

  /// Coefficients of \f$p'\f$.
  Polynomial derivative() const {
    Polynomial d;
    d.coeffs.assign(static_cast<std::size_t>(std::max(degree(), 1)), 0.0);
    for (std::size_t t = 1; t < coeffs.size(); ++t) d.coeffs[t - 1] = static_cast<double>(t) * coeffs[t];
    return d;
  }

  /// \f$\sum_t |a_t| x^t\f$ for \f$x \ge 0\f$: bounds \f$|p|\f$ on \f$[-x, x]\f$.
  double absolute_bound(double x) const {
    double value = 0;
    for (auto a = coeffs.rbegin(); a != coeffs.rend(); ++a) value = value * x + std::abs(*a);
    return value;
  }
};

/// Taylor truncation \f$\sum_{t\le g} x^t/t!\f$ of exp. Throws std::invalid_argument for `degree` < 0.
inline Polynomial taylor_exp(int degree) {
  detail::require(degree >= 0, "polyattn::taylor_exp", "'degree' must be >= 0, got ", degree);
  Polynomial p;
  p.coeffs.assign(static_cast<std::size_t>(degree) + 1, 1.0);
  for (std::size_t t = 1; t < p.coeffs.size(); ++t) p.coeffs[t] = p.coeffs[t - 1] / static_cast<double>(t);
  return p;
}

/// Result of certify_exp().
struct ExpApproximationCertificate {
  /// Certified upper bound on \f$\max_{|x|\le R}|p(x)e^{-x} - 1|\f$.
  double relative_error = std::numeric_limits<double>::infinity();
  /// p is certified positive on \f$[-R, R]\f$.
  bool positive = false;
};

namespace detail {

/// Intervals of the dense evaluation in certify_exp(): 2^14 keeps the \f$h^2/8\f$ term below
/// \f$10^{-9} R^2\max|e''|\f$ while costing well under a millisecond.
inline constexpr int certify_intervals = 1 << 14;

/// \f$p'' - 2p' + p\f$, whose product with \f$e^{-x}\f$ is \f$(p e^{-x})''\f$.
inline Polynomial exp_error_second_derivative(const Polynomial& p) {
  const Polynomial d1 = p.derivative(), d2 = d1.derivative();
  Polynomial b = p;
  for (std::size_t t = 0; t < b.coeffs.size(); ++t) {
    if (t < d1.coeffs.size()) b.coeffs[t] -= 2 * d1.coeffs[t];
    if (t < d2.coeffs.size()) b.coeffs[t] += d2.coeffs[t];
  }
  return b;
}

/// Largest |p(x) e^{-x} - 1| over `samples` equally spaced points of [-R, R] and the points where the
/// error has a local extremum of alternating sign (used by the Remez exchange).
inline double sampled_exp_error(const Polynomial& p, double radius, int samples, std::vector<double>* extrema = nullptr) {
  double worst = 0, previous = 0, slope = 0;
  for (int k = 0; k <= samples; ++k) {
    const double x = -radius + 2 * radius * k / samples;
    const double e = p(x) * std::exp(-x) - 1;
    if (std::isnan(e)) return std::numeric_limits<double>::infinity();  // 0 * inf once e^R overflows
    worst = std::max(worst, std::abs(e));
    if (extrema && k > 0) {
      const double new_slope = e - previous;
      if (k > 1 && (new_slope > 0) != (slope > 0)) extrema->push_back(x - 2 * radius / samples);
      slope = new_slope;
    }
    previous = e;
  }
  return worst;
}

/// Remez exchange for the relative-error minimax polynomial of exp on [-R, R], solved in the scaled
/// variable y = x/R (whose Vandermonde system is well conditioned) and returned in x.
inline Polynomial remez_exp(int degree, double radius) {
  if (!std::isfinite(std::exp(radius))) return taylor_exp(degree);  // the exchange needs e^{\pm R} in double
  const int points = degree + 2;
  std::vector<double> nodes(static_cast<std::size_t>(points));
  for (int i = 0; i < points; ++i)
    nodes[static_cast<std::size_t>(i)] = -radius * std::cos(std::acos(-1.0) * i / (points - 1));
  Polynomial best = taylor_exp(degree);
  double best_error = sampled_exp_error(best, radius, 4096);
  for (int iteration = 0; iteration < 40; ++iteration) {
    Eigen::MatrixXd system(points, points);
    Eigen::VectorXd rhs(points);
    for (int i = 0; i < points; ++i) {
      const double x = nodes[static_cast<std::size_t>(i)], y = x / radius;
      double power = 1;
      for (int t = 0; t <= degree; ++t, power *= y) system(i, t) = power;
      // p(x_i) - e^{x_i} = (-1)^i E e^{x_i}
      system(i, degree + 1) = -((i % 2 == 0) ? 1.0 : -1.0) * std::exp(x);
      rhs(i) = std::exp(x);
    }
    const Eigen::VectorXd solution = system.fullPivLu().solve(rhs);
    Polynomial candidate;
    candidate.coeffs.resize(static_cast<std::size_t>(degree) + 1);
    double scale = 1;
    for (int t = 0; t <= degree; ++t, scale /= radius) candidate.coeffs[static_cast<std::size_t>(t)] = solution(t) * scale;
    std::vector<double> extrema;
    const double error = sampled_exp_error(candidate, radius, 4096, &extrema);
    if (!std::isfinite(error)) break;
    if (error < best_error) {
      best = candidate;
      best_error = error;
    }
    extrema.insert(extrema.begin(), -radius);
    extrema.push_back(radius);
    if (static_cast<int>(extrema.size()) != points) break;  // lost alternation: keep the best so far
    const double levelled = std::abs(solution(degree + 1));
    nodes = extrema;
    if (error - levelled <= 1e-6 * error) break;
  }
  return best;
}

}  // namespace detail

/// Relative-error minimax polynomial of degree `degree` for exp on [-radius, radius].
/// Beyond radius ~709.78, where \f$e^R\f$ overflows double, the exchange cannot run and the Taylor
/// truncation is returned (certify_exp() then reports an infinite error, so nothing is claimed).
/// Throws std::invalid_argument for a negative degree or a non-positive radius.
inline Polynomial minimax_exp(int degree, double radius) {
  detail::require(degree >= 0, "polyattn::minimax_exp", "'degree' must be >= 0, got ", degree);
  detail::require_positive("polyattn::minimax_exp", "radius", radius);
  return detail::remez_exp(degree, radius);
}

/// The polynomial of the given kind; `radius` is used by PolynomialKind::minimax only.
inline Polynomial exp_polynomial(PolynomialKind kind, int degree, double radius) {
  return kind == PolynomialKind::taylor ? taylor_exp(degree) : minimax_exp(degree, radius);
}

/// Certified bound on \f$\max_{|x|\le R}|p(x)e^{-x} - 1|\f$ and on the sign of p (see the file docs).
/// `radius` = 0 certifies the single point 0. The error is \f$+\infty\f$ (never NaN) when the bound cannot
/// be evaluated in double (\f$e^R\f$ overflows). Throws std::invalid_argument for a negative or
/// non-finite radius and for a polynomial without coefficients.
inline ExpApproximationCertificate certify_exp(const Polynomial& p, double radius) {
  detail::require(!p.coeffs.empty(), "polyattn::certify_exp", "polynomial 'p' must have at least one coefficient");
  detail::require(std::isfinite(radius) && radius >= 0, "polyattn::certify_exp",
                  "'radius' must be finite and >= 0, got ", radius);
  const double u = std::numeric_limits<double>::epsilon() / 2;
  const double growth = std::exp(radius);
  const double evaluation_rounding = 4 * (p.degree() + 2) * u * p.absolute_bound(radius);  // of p alone
  const double rounding = evaluation_rounding * growth + 2 * u;
  const double h = 2 * radius / detail::certify_intervals;
  const double interpolation =
      h * h / 8 * growth * detail::exp_error_second_derivative(p).absolute_bound(radius);
  ExpApproximationCertificate cert;
  cert.relative_error = detail::sampled_exp_error(p, radius, detail::certify_intervals) + interpolation + rounding;
  if (std::isnan(cert.relative_error)) cert.relative_error = std::numeric_limits<double>::infinity();
  if (p.coeffs == taylor_exp(p.degree()).coeffs) {
    double remainder = growth;
    for (int t = 1; t <= p.degree() + 1; ++t) remainder *= radius / t;
    double coefficient_rounding = 0, power = 1;
    for (int t = 0; t <= p.degree(); ++t, power *= radius)
      coefficient_rounding += 2 * t * u * p.coeffs[static_cast<std::size_t>(t)] * power;
    if (coefficient_rounding > 0) remainder += growth * coefficient_rounding;  // inf * 0 when R overflows exp
    cert.relative_error = std::min(cert.relative_error, remainder);
    cert.positive = p.degree() % 2 == 0 || cert.relative_error < 1;
    if (cert.positive) return cert;
  }
  if (cert.relative_error < 1) {
    cert.positive = true;
    return cert;
  }
  double lowest = std::numeric_limits<double>::infinity();
  for (int k = 0; k <= detail::certify_intervals; ++k) lowest = std::min(lowest, p(-radius + h * k));
  const double curvature = p.derivative().derivative().absolute_bound(radius);
  cert.positive = lowest - h * h / 8 * curvature - evaluation_rounding > 0;
  return cert;
}

/// Smallest degree whose certified relative error on [-radius, radius] is at most `target_error`.
/// With `even_only` only even degrees are tried (even Taylor truncations are positive everywhere).
/// Throws std::invalid_argument for a bad argument and std::domain_error when no degree up to
/// `max_degree` reaches the target (in double, rounding limits the reachable error to about
/// \f$10^{-16}e^{2R}\f$).
inline int select_degree(double radius, double target_error, PolynomialKind kind = PolynomialKind::taylor,
                         bool even_only = true, int max_degree = 64) {
  constexpr const char* where = "polyattn::select_degree";
  detail::require(std::isfinite(radius) && radius >= 0, where, "'radius' must be finite and >= 0, got ", radius);
  detail::require_positive(where, "target_error", target_error);
  detail::require(max_degree >= 0, where, "'max_degree' must be >= 0, got ", max_degree);
  const int step = even_only ? 2 : 1;
  for (int g = 0; g <= max_degree; g += step) {
    const Polynomial p = radius > 0 ? exp_polynomial(kind, g, radius) : taylor_exp(g);
    if (certify_exp(p, radius).relative_error <= target_error) return g;
  }
  throw std::domain_error(detail::concat(where, ": no degree <= ", max_degree, " reaches relative error ",
                                         target_error, " on [-", radius, ", ", radius, "]"));
}

}  // namespace polyattn
