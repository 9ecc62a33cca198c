// levattn stream: the universal set of a key file read block by block (StreamingUniversalSet),
// with a state file to stop and resume.
#include <iostream>

#include "cli/cli.hpp"

namespace levattn::cli {
namespace {

struct StreamArgs {
  std::string keys, values, checkpoint, resume;
  double eps = 0.0;
  index_t block = 65536;
  bool json = false;
};

// Blocks between checkpoints when --checkpoint is given (and the end of the stream).
constexpr index_t kCheckpointBlocks = 16;

StreamingUniversalSet start(const StreamArgs& a, index_t d, index_t dv) {
  if (a.resume.empty()) return StreamingUniversalSet(d, dv, a.eps);
  StreamingUniversalSet s = StreamingUniversalSet::load(a.resume);
  const auto mismatch = [&](const std::string& what) {
    throw Error(ErrorKind::invalid_argument, "resume (" + a.resume + ")", what);
  };
  if (s.d() != d) mismatch("the state has d = " + std::to_string(s.d()) + ", the keys " + std::to_string(d) + " columns");
  if (s.dv() != dv) mismatch("the state has dv = " + std::to_string(s.dv()) + ", the values " + std::to_string(dv) + " columns");
  if (s.eps() != a.eps) mismatch("the state was made with eps = " + format_value(s.eps(), "%.17g"));
  return s;
}

int run_stream(const StreamArgs& a) {
  if (a.block < 1) throw Error(ErrorKind::invalid_argument, "block", "expected an integer >= 1, got " + std::to_string(a.block));
  const NpyRowReader K(a.keys);
  std::unique_ptr<NpyRowReader> V;
  if (!a.values.empty()) {
    V = std::make_unique<NpyRowReader>(a.values);
    if (V->rows() != K.rows())
      throw Error(ErrorKind::invalid_argument, "values (" + a.values + ")",
                  "expected " + std::to_string(K.rows()) + " rows (one per key), got " + std::to_string(V->rows()));
  }
  const index_t n = K.rows(), d = K.cols(), dv = V ? V->cols() : 0;
  StreamingUniversalSet s = start(a, d, dv);
  const index_t first = s.n();
  if (first > n)
    throw Error(ErrorKind::invalid_argument, "resume (" + a.resume + ")",
                "the state holds " + std::to_string(first) + " keys, the key file only " + std::to_string(n));
  const auto t0 = std::chrono::steady_clock::now();
  Progress progress("levattn stream");
  std::vector<float> kb, vb;
  index_t blocks = 0;
  for (index_t r0 = first; r0 < n; r0 += a.block) {
    const index_t rows = std::min(a.block, n - r0);
    kb.resize(static_cast<std::size_t>(rows * d));
    vb.resize(static_cast<std::size_t>(rows * dv));
    K.read(r0, rows, kb.data());
    if (V) V->read(r0, rows, vb.data());
    try {
      s.push({kb.data(), rows, d}, {vb.data(), dv > 0 ? rows : 0, dv});
    } catch (const Error& e) {  // name the file and the block (row numbers in the message are the block's)
      const bool values = e.field() == "values";
      throw Error(e.kind(), e.field(), e.detail() + " (" + (values ? a.values : a.keys) + ", the block of rows " +
                                           std::to_string(r0) + " to " + std::to_string(r0 + rows - 1) + ")");
    }
    if (!a.checkpoint.empty() && ++blocks % kCheckpointBlocks == 0) s.save(a.checkpoint);
    progress(static_cast<double>(r0 + rows - first) / static_cast<double>(std::max<index_t>(1, n - first)));
  }
  if (!a.checkpoint.empty()) s.save(a.checkpoint);
  const UniversalSet u = s.universal_set();
  const double secs = seconds_since(t0);
  if (a.json) {
    json j;
    j["n"] = s.n();
    j["d"] = d;
    j["dv"] = dv;
    j["eps"] = a.eps;
    j["resumed_from"] = first;
    j["size"] = u.indices.size();
    j["indices"] = u.indices;
    j["scores"] = u.scores;
    j["rank"] = u.rank;
    j["score_rel_error_bound"] = u.score_rel_error_bound;
    j["candidates"] = s.candidates();
    j["peak_workspace_bytes"] = s.peak_workspace_bytes();
    j["seconds"] = secs;
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "keys: n = " << s.n() << ", d = " << d << (first > 0 ? " (resumed at key " + std::to_string(first) + ")" : "")
              << "\nuniversal set: " << u.indices.size() << " keys (rank " << u.rank << "; the offline set exactly)\n"
              << "state: " << s.candidates() << " candidate keys, peak workspace " << s.peak_workspace_bytes()
              << " bytes\nin " << secs << " s\n";
  }
  return 0;
}

}  // namespace

Command add_stream(CLI::App& app) {
  auto a = std::make_shared<StreamArgs>();
  auto* sub = app.add_subcommand("stream", "universal set of a key file in one pass, block by block (x^2 scores)");
  sub->add_option("--keys", a->keys, "keys K .npy (n, d), float32 or float64, C order; read by blocks")->required();
  sub->add_option("--values", a->values, "values V .npy (n, dv): kept beside their keys in the state");
  sub->add_option("--eps", a->eps, "every key that can be eps-heavy, eps in (0, 1]")->required();
  sub->add_option("--block", a->block, "keys read and pushed at a time (default 65536)");
  sub->add_option("--checkpoint", a->checkpoint, "write the state here every 16 blocks and at the end (atomically)");
  sub->add_option("--resume", a->resume, "start from this state and read the keys after those it holds");
  add_json_flag(sub, a->json, "n, size, indices (ascending), scores, peak_workspace_bytes, ...");
  return {sub, [a] { return run_stream(*a); }};
}

}  // namespace levattn::cli
