#include <unistd.h>

#include <cstdio>
#include <sstream>

#include "cli/cli.hpp"

namespace levattn::cli {

void add_method_options(CLI::App* sub, MethodArgs& m) {
  sub->add_option("--method", m.method, "leverage scores: exact (default) or sketch")
      ->check(CLI::IsMember({"exact", "sketch"}));
  sub->add_option("--sketch", m.sketch, "sketch: countsketch (default), srht or gaussian")
      ->check(CLI::IsMember({"countsketch", "srht", "gaussian"}));
  sub->add_option("--sketch-size", m.sketch_size, "sketch: rows of the sketch (default: for gamma 0.2)");
}

LeverageOptions leverage_options(const MethodArgs& m, std::uint64_t seed) {
  LeverageOptions o;
  o.method = m.method == "sketch" ? ScoreMethod::sketch : ScoreMethod::exact;
  o.sketch = parse_sketch_kind(m.sketch);
  o.sketch_size = m.sketch_size;
  o.seed = seed;
  return o;
}

Input load_input(const std::filesystem::path& path, const std::string& what, int max_dims) {
  Array a = read_npy(path);
  const auto dims = static_cast<int>(a.shape.size());
  if (dims < 2 || dims > max_dims) {
    std::ostringstream os;
    os << path.string() << ": " << what << ": expected a 2-D";
    if (max_dims >= 3) os << (max_dims == 3 ? " or 3-D" : ", 3-D or 4-D");
    os << " array, got " << dims << "-D";
    throw Error(ErrorKind::invalid_argument, os.str());
  }
  for (index_t extent : a.shape) {
    if (extent < 1) {
      throw Error(ErrorKind::invalid_argument,
                  path.string() + ": " + what + ": expected a non-empty array, got a dimension of 0");
    }
  }
  Input in;
  in.path = path;
  in.shape = a.shape;
  try {
    in.values = to_float32(a, what);
  } catch (const Error& e) {
    throw Error(e.kind(), path.string() + ": " + e.what());
  }
  return in;
}

Tensor4Ref as_tensor(const Input& in) {
  Tensor4Ref t;
  t.data = in.values.data();
  const auto& s = in.shape;
  const std::size_t k = s.size();
  t.rows = s[k - 2];
  t.cols = s[k - 1];
  t.heads = k >= 3 ? s[k - 3] : 1;
  t.batch = k >= 4 ? s[k - 4] : 1;
  return t;
}

std::string annotate(const std::string& message, const std::vector<const Input*>& inputs,
                     const std::vector<std::string>& names) {
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const std::string prefix = names[i] + ":";
    if (message.rfind(prefix, 0) == 0)
      return names[i] + " (" + inputs[i]->path.string() + ")" + message.substr(names[i].size());
  }
  return message;
}

Progress::Progress(std::string label)
    : label_(std::move(label)), start_(std::chrono::steady_clock::now()), tty_(isatty(2) != 0) {}

Progress::~Progress() {
  if (shown_) std::fprintf(stderr, "\r%s: done      \n", label_.c_str());
}

void Progress::operator()(double fraction) {
  if (!tty_) return;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (elapsed < 2.0) return;
  const int percent = static_cast<int>(fraction * 100.0);
  if (percent == last_percent_) return;
  last_percent_ = percent;
  shown_ = true;
  std::fprintf(stderr, "\r%s: %3d%% (%.0f s)", label_.c_str(), percent, elapsed);
  std::fflush(stderr);
}

}  // namespace levattn::cli
