#include <polyattn/polyattn.hpp>

int main() {
  const polyattn::Matrix<double> q = polyattn::Matrix<double>::Identity(2, 3);
  polyattn::detail::require_shape("consumer", "q", q, 2, 3);
  return 0;
}
