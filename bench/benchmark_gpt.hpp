// The GPT every model benchmark times (bench_model.cpp, bench_generation.cpp): 2 layers, d_model 64, 4 heads
// (d_h = 16, r = 153 features at g = 2), Taylor degree g = 2 for the polynomial methods, byte vocabulary (256),
// random weights from seed 1 (the cost of a step or a token does not depend on what was learned).
#pragma once

#include <polyattn/nn/gpt.hpp>

inline polyattn::GPTConfig benchmark_gpt_config(polyattn::AttentionMethod method, polyattn::Index context) {
  polyattn::GPTConfig config;
  config.vocab_size = 256;
  config.context = context;
  config.d_model = 64;
  config.heads = 4;
  config.layers = 2;
  config.method = method;
  config.approximation.degree = 2;
  config.seed = 1;
  return config;
}
