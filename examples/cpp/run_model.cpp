// Loads an fxcomp TorchScript artifact (model.pt) with LibTorch and runs it on a
// deterministic input: x[i] = (i % 17) / 17 - 0.5 over the given shape.
// Prints the output shape, then every output value, one per line.
//
//   run_model model.pt 1 3 224 224
#include <torch/script.h>

#include <functional>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: run_model model.pt DIM [DIM ...]\n";
    return 2;
  }
  std::vector<int64_t> shape;
  for (int i = 2; i < argc; ++i) shape.push_back(std::atoll(argv[i]));

  torch::jit::Module model;
  try {
    model = torch::jit::load(argv[1]);
  } catch (const c10::Error& err) {
    std::cerr << "cannot load " << argv[1] << ": " << err.what() << "\n";
    return 1;
  }
  model.eval();
  torch::NoGradGuard no_grad;

  auto count = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
  auto input = (torch::arange(count, torch::kFloat32).fmod(17) / 17.0 - 0.5).reshape(shape);
  auto output = model.forward({input}).toTensor().contiguous();

  std::cout << "shape";
  for (auto d : output.sizes()) std::cout << " " << d;
  std::cout << "\n" << std::setprecision(9);
  auto values = output.flatten();
  for (int64_t i = 0; i < values.numel(); ++i) std::cout << values[i].item<float>() << "\n";
  return 0;
}
