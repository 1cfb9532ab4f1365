// A downstream program: approximate causal attention through the installed (or add_subdirectory'd)
// package, checked against the exact reference so that a broken install fails loudly.
#include <polyattn/polyattn.hpp>

#include <cstdio>

int main() {
  const polyattn::Index n = 64, d = 8;
  const polyattn::Matrix<double> Q = 0.3 * polyattn::Matrix<double>::Random(n, d);
  const polyattn::Matrix<double> K = 0.3 * polyattn::Matrix<double>::Random(n, d);
  const polyattn::Matrix<double> V = polyattn::Matrix<double>::Random(n, d);

  polyattn::PolynomialAttentionOptions options;
  options.attention.causal = true;
  options.degree = 6;
  polyattn::PolynomialAttention<double> attention(options);
  polyattn::Matrix<double> O(n, d);
  const polyattn::Certificate cert = attention.forward(Q, K, V, O);

  const polyattn::Matrix<double> exact = polyattn::attention_reference(Q, K, V, options.attention);
  const double error = (O - exact).cwiseAbs().maxCoeff();
  std::printf("polyattn consumer: max |O - O_exact| = %.3g, certified bound %.3g\n", error, cert.output_bound);
  return !cert.vacuous() && error <= cert.output_bound ? 0 : 1;
}
