// levattn-mpi: attend, universal and heavy with the rows of Q, K and V sharded across the
// processes of mpirun (distributed.hpp). Each rank reads only its rows of the .npy files; the
// outputs are levattn's, written once. Exit codes as levattn: 0, 2 bad input or usage, 1
// internal; a failure on any rank ends every rank with the same code, the message printed once.
#include <mpi.h>

#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>
#include <new>

#include "cli/cli.hpp"
#include "levattn/distributed.hpp"

namespace levattn::cli {
namespace {

struct Mpi {
  int rank = 0, size = 1;
  MPI_Comm comm = MPI_COMM_WORLD;
};

// This rank's rows (shard_of the file's rows) of every (batch, head) pair of a .npy file.
struct Sharded {
  std::string source;
  std::vector<index_t> shape;
  Shard shard;
  std::vector<float> values;
  Tensor4Ref view() const {
    const std::size_t k = shape.size();
    return {values.data(), k >= 4 ? shape[k - 4] : 1, k >= 3 ? shape[k - 3] : 1, shard.rows, shape[k - 1]};
  }
  index_t rows() const { return shape[shape.size() - 2]; }
  index_t cols() const { return shape.back(); }
};

Sharded read_shard(const std::string& path, const std::string& what, const Mpi& mpi) {
  if (path.empty()) throw Error(ErrorKind::invalid_argument, what + ": give --" + what + " FILE.npy");
  const NpyRowReader r(path, 4);
  Sharded s;
  s.source = path;
  s.shape = r.shape();
  for (index_t e : s.shape)
    if (e < 1) throw Error(ErrorKind::invalid_argument, path + ": " + what + ": expected a non-empty array, got a dimension of 0");
  s.shard = shard_of(r.rows(), mpi.rank, mpi.size);
  s.values = allocate_named<float>({r.pairs(), s.shard.rows, r.cols()}, path + ": " + what);
  r.read(s.shard.first, s.shard.rows, s.values.data());
  return s;
}

// The named inputs, each rank its rows, with levattn's check that they are the same stack of
// (batch, head) pairs (widths and lengths are the library's to check).
std::vector<Sharded> read_inputs(const Mpi& mpi, const std::vector<std::string>& files, const std::vector<std::string>& names) {
  std::vector<Sharded> in(files.size());
  collectively(mpi.comm, [&] {
    for (std::size_t i = 0; i < files.size(); ++i) in[i] = read_shard(files[i], names[i], mpi);
    for (std::size_t i = 1; i < in.size(); ++i)
      if (in[i].shape.size() != in[0].shape.size() ||
          !std::equal(in[0].shape.begin(), in[0].shape.end() - 2, in[i].shape.begin()))
        throw Error(ErrorKind::invalid_argument, names[0] + " (" + in[0].source + "), " + names[i] + " (" +
                                                     in[i].source + "): expected the same number of dimensions and the "
                                                     "same leading (batch, heads) dimensions");
  });
  return in;
}

// A library error about one of the named arguments ("rank R: keys: ...") gets that input's
// file: "rank R: keys (K.npy): ...".
template <class F>
auto naming_sources(const std::vector<Sharded>& in, const std::vector<std::string>& names, F&& f) {
  try {
    return f();
  } catch (const CollectiveError& e) {
    const std::string field = e.field();
    for (std::size_t i = 0; i < in.size(); ++i)
      if (field == names[i]) throw CollectiveError(e.kind(), e.rank(), names[i] + " (" + in[i].source + ")", e.detail());
    throw;
  }
}

// Runs f, a check of the arguments (the same on every rank): its Error becomes the
// CollectiveError every rank throws, so that each exits and rank 0 reports it once.
template <class F>
auto same_on_every_rank(F&& f) {
  try {
    return f();
  } catch (const CollectiveError&) {
    throw;
  } catch (const Error& e) {
    throw CollectiveError(e.kind(), e.field(), e.detail());
  }
}

DistributedMode mode_of(int rounds) { return rounds == 2 ? DistributedMode::two_round : DistributedMode::exact; }

// Per-rank bytes and seconds, gathered on rank 0 as a JSON array (not counted in the volumes).
json per_rank(const Mpi& mpi, const CommVolume& work, const CommVolume& output, double seconds) {
  const double mine[5] = {static_cast<double>(work.sent), static_cast<double>(work.received),
                          static_cast<double>(output.sent), static_cast<double>(output.received), seconds};
  std::vector<double> all(static_cast<std::size_t>(5 * mpi.size));
  MPI_Gather(mine, 5, MPI_DOUBLE, all.data(), 5, MPI_DOUBLE, 0, mpi.comm);
  json j = json::array();
  for (int r = 0; r < mpi.size; ++r) {
    const double* x = all.data() + 5 * r;
    j.push_back({{"rank", r},
                 {"bytes_sent", static_cast<std::uint64_t>(x[0])},
                 {"bytes_received", static_cast<std::uint64_t>(x[1])},
                 {"output_bytes_sent", static_cast<std::uint64_t>(x[2])},
                 {"output_bytes_received", static_cast<std::uint64_t>(x[3])},
                 {"seconds", x[4]}});
  }
  return j;
}

// ---------------------------------------------------------------------------------------------

struct AttendArgs {
  std::string queries, keys, values, out, select = "full";
  ScaleOption scale;
  bool json = false;
  int rounds = 1;
};

int run_attend(const AttendArgs& a, const Mpi& mpi) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<std::string> names = {"queries", "keys", "values"};
  const std::vector<Sharded> in = read_inputs(mpi, {a.queries, a.keys, a.values}, names);
  const Sharded &Q = in[0], &K = in[1], &V = in[2];
  AttentionOptions o = same_on_every_rank([&] {
    AttentionOptions given = parse_selection(a.select);
    a.scale.apply(given);
    return given;
  });
  const Tensor4Ref q = Q.view(), k = K.view(), v = V.view();
  std::vector<float> out = allocate_named<float>({q.batch, q.heads, q.rows, v.cols}, "output (" + a.out + ")");
  CommVolume work, written;
  const AttentionResult r = naming_sources(in, names, [&] {
    return distributed_attention(mpi.comm, q, Q.shard.first, k, v, K.shard.first, out.data(), o, mode_of(a.rounds), &work);
  });
  std::vector<index_t> shape = Q.shape;
  shape.back() = V.cols();
  write_npy_rows(mpi.comm, a.out, shape, Q.shard.first, Q.shard.rows, out.data(), &written);
  const json ranks = per_rank(mpi, work, written, seconds_since(t0));
  if (a.json && mpi.rank == 0) {
    json j;
    j["ranks"] = mpi.size;
    j["shape"] = shape;
    j["kernel"] = to_string(o.kernel);
    j["select"] = to_string(o.select);
    j["selection"] = selection_spec(o);
    j["mode"] = to_string(mode_of(a.rounds));
    j["n"] = K.rows();
    j["shared_sizes"] = r.shared_sizes;
    j["mean_keys_per_query"] = r.mean_keys_per_query;
    j["empty_rows"] = r.empty_rows;
    j["seconds"] = {{"selection", r.seconds_selection}, {"attention", r.seconds_attention}, {"total", seconds_since(t0)}};
    j["per_rank"] = ranks;
    std::cout << j.dump() << "\n";
  }
  if (r.empty_rows > 0 && mpi.rank == 0)
    std::cerr << "levattn-mpi attend: " << r.empty_rows << " queries had no selected key or a zero normaliser; their output rows are 0\n";
  return 0;
}

Command add_attend(CLI::App& app, const Mpi& mpi) {
  auto a = std::make_shared<AttendArgs>();
  auto* sub = app.add_subcommand("attend", "attention over a selection of keys, rows sharded across the ranks");
  add_qkv_file_options(sub, &a->queries, &a->keys, &a->values);
  sub->add_option("--out", a->out, "output O .npy (float32), written once")->required();
  add_select_option(sub, a->select,
                    "full (a ring: the exact baseline), leverage+eps:E or window:W (a halo from the neighbouring "
                    "ranks), with +window:W, +sinks:S, +kernel:poly+p:P");
  a->scale.add(sub);
  const auto retired = retire_selection_options(sub);
  sub->add_option("--rounds", a->rounds,
                  "leverage: 1 = exact x^2 (one Allreduce of K^T K; softmax or p 2), 2 = composable (any p; a superset "
                  "of the single-process set)")
      ->check(CLI::IsMember({1, 2}));
  add_json_flag(sub, a->json, "sizes, timings and per-rank bytes (rank 0)");
  return {sub, [a, retired, &mpi] {
            same_on_every_rank(retired);
            return run_attend(*a, mpi);
          }};
}

// ---------------------------------------------------------------------------------------------

struct UniversalArgs {
  std::string keys, out;
  double eps = 0, p = 2.0;
  int rounds = 1;
  bool json = false;
};

int run_universal(const UniversalArgs& a, const Mpi& mpi) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<Sharded> in = read_inputs(mpi, {a.keys}, {"keys"});
  const Sharded& K = in[0];
  UniversalOptions o;
  o.eps = a.eps;
  o.p = a.p;
  CommVolume work, written;
  const std::vector<UniversalSet> sets = naming_sources(in, {"keys"}, [&] {
    return distributed_universal_sets(mpi.comm, K.view(), K.shard.first, o, mode_of(a.rounds), &work);
  });
  const bool stacked = K.shape.size() > 2;
  if (!a.out.empty()) collectively(mpi.comm, [&] { if (mpi.rank == 0) write_sets(a.out, sets, stacked); });
  const json ranks = per_rank(mpi, work, written, seconds_since(t0));
  if (mpi.rank != 0) return 0;
  if (a.json) {
    json j;
    j["ranks"] = mpi.size;
    j["n"] = K.rows();
    j["d"] = K.cols();
    j["eps"] = a.eps;
    j["p"] = a.p;
    j["mode"] = to_string(mode_of(a.rounds));
    j["seconds"] = seconds_since(t0);
    j["sets"] = json::array();
    for (const UniversalSet& u : sets) j["sets"].push_back(set_json(u));
    j["per_rank"] = ranks;
    std::cout << j.dump() << "\n";
  } else {
    for (std::size_t h = 0; h < sets.size(); ++h)
      std::cout << (stacked ? "pair " + std::to_string(h) + ": " : "") << "rank = " << sets[h].rank
                << ", universal set: " << sets[h].indices.size() << " keys\n";
  }
  return 0;
}

Command add_universal(CLI::App& app, const Mpi& mpi) {
  auto a = std::make_shared<UniversalArgs>();
  auto* sub = app.add_subcommand("universal", "universal set of keys, rows sharded across the ranks");
  add_qkv_file_options(sub, nullptr, &a->keys, nullptr);
  add_universal_eps_option(sub, a->eps)->required();
  sub->add_option("--p", a->p, "f(x) = |x|^p sensitivity bounds (default 2: leverage; p != 2 needs --rounds 2)");
  sub->add_option("--rounds", a->rounds, "1 = exact (p 2), 2 = composable (any p)")->check(CLI::IsMember({1, 2}));
  sub->add_option("--out", a->out, "write the indices: int64 .npy (one key matrix), or .npz with indices, offsets, scores");
  add_json_flag(sub, a->json, "the set, its bound and per-rank bytes (rank 0)");
  return {sub, [a, &mpi] { return run_universal(*a, mpi); }};
}

// ---------------------------------------------------------------------------------------------

struct HeavyArgs {
  std::string queries, keys, out;
  double eps = 0;
  bool json = false;
};

int run_heavy(const HeavyArgs& a, const Mpi& mpi) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<std::string> names = {"queries", "keys"};
  const std::vector<Sharded> in = read_inputs(mpi, {a.queries, a.keys}, names);
  const Sharded &Q = in[0], &K = in[1];
  CommVolume work, written;
  const std::vector<HeavyEntries> mine = naming_sources(in, names, [&] {
    return distributed_heavy_entries(mpi.comm, Q.view(), Q.shard.first, K.view(), K.shard.first, a.eps, &work);
  });
  const std::vector<HeavyEntries> per = gather_heavy_entries(mpi.comm, mine, 0, &written);
  if (!a.out.empty() || !a.json)
    collectively(mpi.comm, [&] { if (mpi.rank == 0) write_heavy(a.out, per, Q.view().heads, Q.shape.size(), a.out.empty()); });
  const json ranks = per_rank(mpi, work, written, seconds_since(t0));
  if (mpi.rank != 0 || !a.json) return 0;
  std::size_t count = 0, zero = 0;
  index_t usize = 0;
  for (const HeavyEntries& r : per) count += r.entries.size(), zero += r.zero_rows.size(), usize += r.universal_size;
  json j;
  j["ranks"] = mpi.size;
  j["m"] = Q.rows();
  j["n"] = K.rows();
  j["d"] = K.cols();
  j["eps"] = a.eps;
  j["count"] = count;
  j["universal_size"] = usize;
  j["zero_rows"] = zero;
  j["seconds"] = seconds_since(t0);
  j["per_rank"] = ranks;
  std::cout << j.dump() << "\n";
  return 0;
}

Command add_heavy(CLI::App& app, const Mpi& mpi) {
  auto a = std::make_shared<HeavyArgs>();
  auto* sub = app.add_subcommand("heavy", "every eps-heavy entry of x^2 attention, rows sharded across the ranks");
  add_qkv_file_options(sub, &a->queries, &a->keys, nullptr);
  add_heavy_eps_option(sub, a->eps);
  sub->add_option("--out", a->out, "H.csv or H.npz (default: CSV on stdout)");
  add_json_flag(sub, a->json, "a summary and per-rank bytes (rank 0)");
  return {sub, [a, &mpi] { return run_heavy(*a, mpi); }};
}

int parse_and_run(int argc, char** argv, const Mpi& mpi) {
  CLI::App app{"levattn-mpi: levattn attend, universal and heavy with the rows sharded across MPI ranks "
               "(mpirun -np P levattn-mpi ...)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(version()));
  const std::vector<Command> commands = {add_attend(app, mpi), add_universal(app, mpi), add_heavy(app, mpi)};
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {  // the same on every rank: each exits, rank 0 says why
    if (mpi.rank != 0) return e.get_exit_code() == 0 ? 0 : 2;
    if (e.get_exit_code() == 0) return app.exit(e);
    std::cerr << "levattn-mpi: " << e.what() << " (see levattn-mpi --help)\n";
    return 2;
  }
  for (const Command& c : commands)
    if (c.app->parsed()) return c.run();
  return 1;
}

}  // namespace
}  // namespace levattn::cli

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  levattn::cli::Mpi mpi;
  MPI_Comm_rank(mpi.comm, &mpi.rank);
  MPI_Comm_size(mpi.comm, &mpi.size);
  int code = 0;
  const auto alone = [&](const char* what, int exit_code) {  // a failure on this rank only: end every rank
    std::cerr << "levattn-mpi: rank " << mpi.rank << ": " << what << "\n";
    MPI_Abort(mpi.comm, exit_code);
  };
  try {
    code = levattn::cli::parse_and_run(argc, argv, mpi);
  } catch (const levattn::CollectiveError& e) {  // thrown on every rank
    if (mpi.rank == 0) std::cerr << "levattn-mpi: " << e.what() << "\n";
    code = levattn::cli::exit_code_of(e.kind());
  } catch (const levattn::Error& e) {
    alone(e.what(), levattn::cli::exit_code_of(e.kind()));
  } catch (const std::bad_alloc&) {
    alone("out of memory", 1);
  } catch (const std::exception& e) {
    alone((std::string("internal error: ") + e.what()).c_str(), 1);
  }
  MPI_Finalize();
  return code;
}
