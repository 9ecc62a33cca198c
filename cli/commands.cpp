#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "cli/cli.hpp"

namespace levattn::cli {
namespace {

// Runs f; a library Error about one of the inputs gets that input's file name.
template <class F>
auto with_files(const std::vector<const Input*>& inputs, const std::vector<std::string>& names, F&& f) {
  try {
    return f();
  } catch (const Error& e) {
    throw Error(e.kind(), annotate(e.what(), inputs, names));
  }
}

std::string format_value(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

}  // namespace

int run_info(bool as_json) {
  const BuildInfo b = build_info();
  json j;
  j["version"] = b.version;
  j["blas"] = b.blas;
  j["blas_core"] = b.blas_core;
  j["isa"] = b.isa;
  j["cpu_isa"] = b.cpu_isa;
  j["threads"] = b.threads;
  j["mpi"] = b.mpi;
  j["sanitizers"] = b.sanitizers;
  if (as_json) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "levattn " << b.version << "\n"
              << "BLAS:     " << b.blas << "\n"
              << "BLAS core: " << b.blas_core << "\n"
              << "ISA:      " << b.isa << " (CPU: " << b.cpu_isa << "; LEVATTN_ISA=avx512|avx2|baseline forces a path)\n"
              << "threads:  " << b.threads << "\n"
              << "MPI:      " << (b.mpi ? "yes" : "not built") << "\n";
  }
  return 0;
}

int run_universal(const UniversalArgs& a) {
  const Input K = load_input(a.keys, "keys", 2);
  const ConstMatrix k{K.values.data(), K.shape[0], K.shape[1]};
  LeverageOptions opt = leverage_options(a.method, a.seed);
  opt.ridge = a.ridge;
  if (a.p != 2.0 && a.ridge != 0.0)
    throw Error(ErrorKind::invalid_argument, "ridge: applies to p = 2 (leverage scores) only");
  const auto t0 = std::chrono::steady_clock::now();
  const LeverageScores scores =
      with_files({&K}, {"keys"}, [&] { return sensitivity_bounds(k, a.p, opt); });
  // sum of scores <= rank^max(1,p/2), and the threshold is eps / (1 + gamma).
  const double size_bound = std::pow(static_cast<double>(scores.rank), std::max(1.0, a.p / 2.0)) *
                            (1.0 + scores.rel_error_bound);
  const UniversalSet u = a.use_top_k ? universal_set_top_k(scores, a.top_k)
                                      : universal_set(scores, a.eps);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!a.out.empty()) {
    write_npy(a.out, Array::from_int64({static_cast<index_t>(u.indices.size())},
                                       std::vector<std::int64_t>(u.indices.begin(), u.indices.end())));
  }
  if (a.json) {
    json j;
    j["n"] = u.n;
    j["d"] = K.shape[1];
    j["rank"] = u.rank;
    if (a.use_top_k) j["top_k"] = a.top_k; else j["eps"] = a.eps;
    j["ridge"] = a.ridge;
    j["p"] = a.p;
    j["size"] = u.indices.size();
    j["bound"] = a.use_top_k ? json(nullptr) : json(std::floor(size_bound / a.eps));
    j["method"] = scores.method == ScoreMethod::sketch ? "sketch" : "exact";
    if (scores.method == ScoreMethod::sketch) {
      j["sketch"] = a.method.sketch;
      j["sketch_size"] = scores.sketch_size;
      j["gamma"] = scores.rel_error_bound;
      j["failure_probability"] = scores.failure_probability;
    }
    j["score_rel_error_bound"] = scores.rel_error_bound;
    j["seconds"] = secs;
    j["indices"] = u.indices;
    j["scores"] = u.scores;
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "keys: n = " << u.n << ", d = " << K.shape[1] << ", rank = " << u.rank << "\n"
              << "universal set: " << u.indices.size() << " keys"
              << (a.use_top_k ? " (top-k by leverage score)"
                               : " (every key with score >= eps / (1 + gamma); at most rank^max(1,p/2) (1 + gamma) / eps = " +
                                     std::to_string(static_cast<long long>(std::floor(size_bound / a.eps))) + ")")
              << " in " << secs << " s\n";
  }
  return 0;
}

int run_heavy(const HeavyArgs& a) {
  const Input Q = load_input(a.queries, "queries", 3), K = load_input(a.keys, "keys", 3);
  if (Q.shape.size() != K.shape.size() || (Q.shape.size() == 3 && Q.shape[0] != K.shape[0])) {
    throw Error(ErrorKind::invalid_argument,
                "queries (" + a.queries + "), keys (" + a.keys +
                    "): expected both (m, d) / (n, d) or both (heads, m, d) / (heads, n, d) with equal heads");
  }
  const Tensor4Ref q = as_tensor(Q), k = as_tensor(K);
  const bool headed = Q.shape.size() == 3;
  const auto t0 = std::chrono::steady_clock::now();
  HeavyOptions ho;
  ho.p = a.p;
  ho.normaliser = a.normaliser == "sampled" ? Normaliser::sampled : Normaliser::exact;
  ho.gamma = a.gamma;
  ho.samples = a.samples;
  ho.seed = a.seed;
  ho.leverage = leverage_options(a.method, a.seed);
  std::vector<HeavyEntries> per_head;
  for (index_t h = 0; h < q.heads; ++h)
    per_head.push_back(with_files({&Q, &K}, {"queries", "keys"},
                                  [&] { return heavy_entries(q.slice(0, h), k.slice(0, h), a.eps, ho); }));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::size_t count = 0, zero = 0;
  index_t usize = 0;
  for (const auto& r : per_head) {
    count += r.entries.size();
    zero += r.zero_rows.size();
    usize += r.universal_size;
  }
  const bool npz = a.out.size() >= 4 && a.out.substr(a.out.size() - 4) == ".npz";
  if (npz) {
    std::vector<std::int64_t> head, query, key;
    std::vector<double> value;
    for (index_t h = 0; h < static_cast<index_t>(per_head.size()); ++h)
      for (const auto& e : per_head[h].entries) {
        head.push_back(h);
        query.push_back(e.query);
        key.push_back(e.key);
        value.push_back(e.value);
      }
    const index_t c = static_cast<index_t>(count);
    std::vector<std::pair<std::string, Array>> arrays;
    if (headed) arrays.emplace_back("head", Array::from_int64({c}, head));
    arrays.emplace_back("query", Array::from_int64({c}, query));
    arrays.emplace_back("key", Array::from_int64({c}, key));
    arrays.emplace_back("value", Array::from_float64({c}, value));
    write_npz(a.out, arrays);
  } else if (!a.out.empty() || !a.json) {
    std::ostringstream csv;
    csv << (headed ? "head,query,key,value\n" : "query,key,value\n");
    for (std::size_t h = 0; h < per_head.size(); ++h)
      for (const auto& e : per_head[h].entries) {
        if (headed) csv << h << ',';
        csv << e.query << ',' << e.key << ',' << format_value(e.value) << '\n';
      }
    if (a.out.empty()) std::cout << csv.str();
    else write_text_file(a.out, csv.str());
  }
  if (a.json) {
    json j;
    j["heads"] = q.heads;
    j["m"] = q.rows;
    j["n"] = k.rows;
    j["d"] = q.cols;
    j["eps"] = a.eps;
    j["p"] = a.p;
    j["normaliser"] = per_head.front().normaliser;
    if (per_head.front().samples > 0) {
      j["samples"] = per_head.front().samples;
      j["gamma"] = per_head.front().gamma;
    }
    j["count"] = count;
    j["universal_size"] = usize;
    j["zero_rows"] = zero;
    j["seconds"] = secs;
    std::cout << j.dump() << "\n";
  }
  if (!a.json && per_head.front().samples > 0)
    std::cerr << "levattn heavy: sampled normalisers (" << per_head.front().samples
              << " keys): values are (1 +- " << per_head.front().gamma << ") estimates\n";
  if (zero > 0) std::cerr << "levattn heavy: " << zero << " queries have a zero row normaliser (orthogonal to every key); they have no entries\n";
  return 0;
}

int run_attend(const AttendArgs& a) {
  const Input Q = load_input(a.queries, "queries", 4), K = load_input(a.keys, "keys", 4),
              V = load_input(a.values, "values", 4);
  if (Q.shape.size() != K.shape.size() || Q.shape.size() != V.shape.size()) {
    throw Error(ErrorKind::invalid_argument,
                "queries (" + a.queries + "), keys (" + a.keys + "), values (" + a.values +
                    "): expected arrays of the same number of dimensions");
  }
  AttentionOptions o;
  o.kernel = a.kernel == "poly" ? Kernel::power : Kernel::softmax;
  o.p = a.p;
  if (a.has_scale) o.scale = a.scale;
  o.select = a.select == "full" ? Select::full
             : a.select == "leverage" ? Select::leverage
             : a.select == "topk" ? Select::topk
             : a.select == "random" ? Select::random
                                    : Select::window;
  o.top_k = a.top_k;
  o.eps = a.eps;
  o.window = a.window;
  o.sinks = a.sinks;
  o.seed = a.seed;
  o.leverage = leverage_options(a.method, a.seed);
  if (!a.budget.empty()) {
    double alpha = 0, c = 0;
    char comma = 0, extra = 0;
    std::istringstream in(a.budget);
    if (!(in >> alpha >> comma >> c) || comma != ',' || (in >> extra))
      throw Error(ErrorKind::invalid_argument, "budget: expected alpha,C (for example 2,0.5), got '" + a.budget + "'");
    o.budget_alpha = alpha;
    o.budget_exponent = c;
  }
  if (a.select == "window" && a.window < 0)
    throw Error(ErrorKind::invalid_argument, "window: --select window needs --window W (W >= 0)");
  Progress progress("levattn attend");
  o.progress = [&](double f) { progress(f); };
  const Tensor4Ref q = as_tensor(Q), k = as_tensor(K), v = as_tensor(V);
  std::vector<index_t> shape = Q.shape;
  shape.back() = v.cols;
  std::vector<float> out(static_cast<std::size_t>(q.batch * q.heads * q.rows * v.cols));
  const AttentionResult r = with_files({&Q, &K, &V}, {"queries", "keys", "values"},
                                       [&] { return attention(q, k, v, out.data(), o); });
  write_npy(a.out, Array::from_float32(shape, std::move(out)));
  if (a.json) {
    json j;
    j["shape"] = shape;
    j["kernel"] = to_string(o.kernel);
    j["select"] = a.select;
    j["n"] = k.rows;
    j["top_k"] = r.top_k;
    j["shared_sizes"] = r.shared_sizes;
    j["mean_keys_per_query"] = r.mean_keys_per_query;
    j["empty_rows"] = r.empty_rows;
    j["seconds"] = {{"selection", r.seconds_selection},
                    {"attention", r.seconds_attention},
                    {"total", r.seconds_selection + r.seconds_attention}};
    std::cout << j.dump() << "\n";
  }
  if (r.empty_rows > 0) std::cerr << "levattn attend: " << r.empty_rows << " queries had no selected key or a zero normaliser; their output rows are 0\n";
  return 0;
}

int run_planted(const PlantedArgs& a) {
  PlantedOptions o;
  o.n = a.n;
  o.d = a.d;
  o.relevant = a.relevant;
  o.seed = a.seed;
  const PlantedInstance p = planted(o);
  const std::filesystem::path dir(a.out_dir);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw Error(ErrorKind::io, a.out_dir + ": cannot create directory: " + ec.message());
  const auto save = [&](const char* name, const DenseMatrix<float>& m) {
    write_npy(dir / name, Array::from_float32({m.rows, m.cols}, m.data));
  };
  save("Q.npy", p.Q);
  save("K.npy", p.K);
  save("V.npy", p.V);
  write_npy(dir / "relevant.npy",
            Array::from_int64({static_cast<index_t>(p.relevant.size())},
                              std::vector<std::int64_t>(p.relevant.begin(), p.relevant.end())));
  std::cout << "wrote " << (dir / "Q.npy").string() << ", K.npy, V.npy (n = " << a.n << ", d = "
            << a.d << ") and relevant.npy (" << p.relevant.size() << " planted keys)\n";
  return 0;
}

}  // namespace levattn::cli
