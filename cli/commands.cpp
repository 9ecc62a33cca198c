// levattn info, universal, heavy, attend and planted.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>

#include "cli/cli.hpp"

namespace levattn::cli {

namespace {

// The arrays of one command: from individual .npy files, or the members of one --inputs .npz.
struct Sources {
  std::string inputs;              // --inputs qkv.npz
  std::vector<std::string> files;  // --queries/--keys/--values, in the order of `names`
};

std::vector<Input> load_all(const Sources& s, const std::vector<std::string>& members,
                            const std::vector<std::string>& names, int max_dims) {
  if (!s.inputs.empty()) {
    for (const std::string& f : s.files)
      if (!f.empty())
        throw Error(ErrorKind::invalid_argument, "inputs", "give either --inputs or the separate files, not both");
    return load_members(s.inputs, members, names, max_dims);
  }
  std::vector<Input> out;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (s.files[i].empty())
      throw Error(ErrorKind::invalid_argument, names[i], "give --" + names[i] + " FILE.npy or --inputs FILE.npz");
    out.push_back(load_input(s.files[i], names[i], max_dims));
  }
  return out;
}

void add_inputs_option(CLI::App* sub, Sources& s, const std::string& members) {
  sub->add_option("--inputs", s.inputs, "an .npz archive holding " + members + " instead of separate files");
}

// --queries, --keys, --values or --inputs with members q, k, v: the inputs of attend and evaluate.
void add_qkv_options(CLI::App* sub, Sources& s) {
  add_qkv_file_options(sub, &s.files[0], &s.files[1], &s.files[2]);
  add_inputs_option(sub, s, "members 'q', 'k' and 'v'");
}

std::vector<index_t> leading_dims(const Input& in) {
  return std::vector<index_t>(in.shape.begin(), in.shape.end() - 2);
}

// ---------------------------------------------------------------------------------------------

int run_info(bool as_json) {
  const BuildInfo b = build_info();
  json j;
  j["version"] = b.version;
  j["blas"] = b.blas;
  j["blas_core"] = b.blas_core;
  j["isa"] = b.isa;
  j["cpu_isa"] = b.cpu_isa;
  j["bf16"] = b.bf16;
  j["threads"] = b.threads;
  j["mpi"] = b.mpi;
  j["sanitizers"] = b.sanitizers;
  if (as_json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << to_string(b);
  return 0;
}

// ---------------------------------------------------------------------------------------------

struct UniversalArgs {
  Sources src{"", {""}};
  std::string out;
  double eps = 0, ridge = 0, p = 2.0;
  index_t top_k = 0;
  bool use_top_k = false;
  std::int64_t seed = 0;
  MethodArgs method;
  bool json = false;
};

int run_universal(const UniversalArgs& a) {
  const std::vector<Input> in = load_all(a.src, {"k"}, {"keys"}, 4);
  const Input& K = in[0];
  UniversalOptions o;
  o.leverage = leverage_options(a.method, a.seed);
  o.leverage.ridge = a.ridge;
  o.p = a.p;
  if (a.use_top_k) o.top_k = a.top_k;
  else o.eps = a.eps;
  if (a.use_top_k && a.top_k < 1)
    throw Error(ErrorKind::invalid_argument, "top-k", "expected an integer >= 1, got " + std::to_string(a.top_k));
  const Tensor4Ref k = as_tensor(K);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<UniversalSet> sets = with_sources({&K}, {"keys"}, [&] { return universal_sets(k, o); });
  const double secs = seconds_since(t0);
  if (a.use_top_k) note_budget("universal", a.top_k, k.rows);
  const bool stacked = K.shape.size() > 2;
  if (!a.out.empty()) write_sets(a.out, sets, stacked);
  const UniversalSet& u0 = sets[0];
  if (a.json) {
    json j;
    if (stacked) j["batch_heads"] = leading_dims(K);
    j["n"] = k.rows;
    j["d"] = k.cols;
    if (a.use_top_k) j["top_k"] = a.top_k; else j["eps"] = a.eps;
    j["ridge"] = a.ridge;
    j["p"] = a.p;
    j["method"] = to_string(u0.method);
    if (u0.method == ScoreMethod::sketch) {
      j["sketch"] = a.method.sketch;
      j["sketch_size"] = u0.sketch_size;
      j["gamma"] = u0.score_rel_error_bound;
      j["failure_probability"] = u0.failure_probability;
    }
    j["score_rel_error_bound"] = u0.score_rel_error_bound;
    j["seconds"] = secs;
    j["scores_of"] = "selected keys";  // `scores` lists the selected keys' scores only
    if (stacked) {
      j["sets"] = json::array();
      for (const UniversalSet& u : sets) j["sets"].push_back(set_json(u));
    } else {
      j.update(set_json(u0));
    }
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "keys: n = " << k.rows << ", d = " << k.cols << (stacked ? ", " + std::to_string(sets.size()) + " (batch, head) pairs" : "")
              << "\n";
    for (std::size_t h = 0; h < sets.size(); ++h) {
      const UniversalSet& u = sets[h];
      if (stacked) std::cout << "pair " << h << ": ";
      std::cout << "rank = " << u.rank << ", universal set: " << u.indices.size() << " keys"
                << (a.use_top_k ? " (top-k by score)"
                                : " (every key with score >= eps / (1 + gamma); at most " +
                                      format_value(std::floor(u.size_bound), "%.6g") + ")");
      if (u.ties_left_out > 0)
        std::cout << "; " << u.ties_left_out << " keys tied with the last one chosen were left out by index"
                  << (u.rank == k.rows ? " (K has full row rank: every score is 1, the choice is arbitrary)" : "");
      std::cout << "\n";
    }
    std::cout << "in " << secs << " s\n";
  }
  return 0;
}

}  // namespace

Command add_universal(CLI::App& app) {
  auto a = std::make_shared<UniversalArgs>();
  auto* sub = app.add_subcommand("universal", "universal set of keys by leverage score (or |x|^p sensitivity bound)");
  add_qkv_file_options(sub, nullptr, &a->src.files[0], nullptr);
  add_inputs_option(sub, a->src, "the keys as member 'k'");
  auto* eps = add_universal_eps_option(sub, a->eps);
  auto* top = sub->add_option("--top-k", a->top_k, "the N keys of largest score (N above n: every key)");
  eps->excludes(top);
  sub->add_option("--ridge", a->ridge, "ridge lambda >= 0 (p = 2)");
  sub->add_option("--p", a->p, "f(x) = |x|^p: scores are sensitivity bounds from Lewis weights (default 2: leverage)");
  add_seed_option(sub, a->seed, "the sketch");
  add_method_options(sub, a->method);
  add_json_flag(sub, a->json, "the set, its bound and timing");
  sub->add_option("--out", a->out, "write the indices: int64 .npy (one key matrix), or .npz with indices, offsets, scores");
  return {sub, [a, eps, top] {
            if (eps->count() == 0 && top->count() == 0)
              throw Error(ErrorKind::invalid_argument, "universal", "give --eps or --top-k");
            a->use_top_k = top->count() > 0;
            return run_universal(*a);
          }};
}

namespace {

// ---------------------------------------------------------------------------------------------

struct HeavyArgs {
  Sources src{"", {"", ""}};
  std::string out, normaliser = "exact", search = "exact";
  double eps = 0, p = 2.0, gamma = 0.1, delta = 0.01;
  bool causal = false;
  index_t samples = 0;
  std::int64_t seed = 0;
  MethodArgs method;
  bool json = false;
};

int run_heavy(const HeavyArgs& a) {
  const std::vector<Input> in = load_all(a.src, {"q", "k"}, {"queries", "keys"}, 4);
  const Input &Q = in[0], &K = in[1];
  require_same_stack({&Q, &K}, {"queries", "keys"});
  const Tensor4Ref q = as_tensor(Q), k = as_tensor(K);
  HeavyOptions ho;
  ho.p = a.p;
  ho.normaliser = parse_normaliser(a.normaliser);
  ho.gamma = a.gamma;
  ho.delta = a.delta;
  ho.search = parse_heavy_search(a.search);
  ho.samples = a.samples;
  ho.seed = static_cast<std::uint64_t>(a.seed);
  ho.leverage = leverage_options(a.method, a.seed);
  ho.causal = a.causal;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<HeavyEntries> per = with_sources({&Q, &K}, {"queries", "keys"},
                                                     [&] { return heavy_entries(q, k, a.eps, ho); });
  const double secs = seconds_since(t0);
  std::size_t count = 0, zero = 0;
  index_t usize = 0, candidates = 0;
  for (const HeavyEntries& r : per) {
    count += r.entries.size();
    zero += r.zero_rows.size();
    usize += r.universal_size;
    candidates += r.candidates;
  }
  if (!a.out.empty() || !a.json) write_heavy(a.out, per, q.heads, Q.shape.size(), a.out.empty());
  const HeavyEntries& first = per.front();
  if (a.json) {
    json j;
    if (Q.shape.size() >= 4) j["batch"] = q.batch;
    j["heads"] = q.heads;
    j["m"] = q.rows;
    j["n"] = k.rows;
    j["d"] = q.cols;
    j["eps"] = a.eps;
    j["p"] = a.p;
    j["causal"] = a.causal;
    j["normaliser"] = first.normaliser;
    if (first.samples > 0) {
      j["samples"] = first.samples;
      j["gamma"] = first.gamma;
    }
    j["search"] = a.search;
    if (ho.search == HeavySearch::countsketch) {
      j["delta"] = a.delta;
      j["sketch_rows"] = first.sketch_rows;
      j["sketch_buckets"] = first.sketch_buckets;
      j["candidates"] = candidates;
    }
    j["count"] = count;
    j["universal_size"] = usize;
    j["zero_rows"] = zero;
    j["seconds"] = secs;
    std::cout << j.dump() << "\n";
  }
  if (!a.json && first.samples > 0)
    std::cerr << "levattn heavy: sampled normalisers (" << first.samples << " keys): values are (1 +- "
              << first.gamma << ") estimates\n";
  if (zero > 0)
    std::cerr << "levattn heavy: " << zero << " queries have a zero row normaliser (orthogonal to every key, "
              << "to float64 resolution); they have no entries\n";
  return 0;
}

}  // namespace

Command add_heavy(CLI::App& app) {
  auto a = std::make_shared<HeavyArgs>();
  auto* sub = app.add_subcommand("heavy", "every eps-heavy entry of x^2 (or |x|^p) attention, exactly");
  add_qkv_file_options(sub, &a->src.files[0], &a->src.files[1], nullptr);
  add_inputs_option(sub, a->src, "members 'q' and 'k'");
  add_heavy_eps_option(sub, a->eps);
  sub->add_option("--out", a->out, "H.csv or H.npz (default: CSV on stdout)");
  sub->add_option("--p", a->p, "f(x) = |x|^p (default 2)");
  sub->add_option("--normaliser", a->normaliser, "exact (default) or sampled row normalisers")
      ->check(CLI::IsMember({"exact", "sampled"}));
  sub->add_option("--gamma", a->gamma, "sampled: target accuracy in (0, 1) (default 0.1)");
  sub->add_option("--samples", a->samples, "sampled: keys to draw (default: from --gamma)");
  sub->add_option("--search", a->search,
                  "exact (default: every key of U) or countsketch (x^2, exact normalisers: a CountSketch of U, "
                  "candidates verified exactly)")
      ->check(CLI::IsMember({"exact", "countsketch"}));
  sub->add_option("--delta", a->delta, "failure probability in (0, 1) of sampled normalisers or countsketch "
                                       "(default 0.01)");
  sub->add_flag("--causal", a->causal, "causal x^2 attention: query i over keys 0 .. i (m == n)");
  add_seed_option(sub, a->seed, "the sampled normalisers, the countsketch search and the score sketch");
  add_method_options(sub, a->method);
  add_json_flag(sub, a->json, "a summary");
  return {sub, [a] { return run_heavy(*a); }};
}

namespace {

// ---------------------------------------------------------------------------------------------

struct AttendArgs {
  Sources src{"", {"", "", ""}};
  std::string out, save_selection, select = "full";
  ScaleOption scale;
  bool json = false, causal = false;
};

AttentionOptions attention_options(const AttendArgs& a) {
  AttentionOptions o = parse_selection(a.select);
  a.scale.apply(o);
  o.causal = a.causal;
  o.return_selection = !a.save_selection.empty();
  return o;
}

// The keys each query attended: per (batch, head) its shared keys (offsets into one array),
// the per-query keys of topk, and the window and sinks that every query adds.
std::vector<std::pair<std::string, Array>> selection_arrays(const AttentionResult& r, const Input& Q,
                                                            const AttentionOptions& o) {
  if (o.select == Select::full)
    throw Error(ErrorKind::invalid_argument, "save-selection", "select full attends every key; there is no selection to save");
  // One set per (batch, head) (per segment too under causal leverage); empty for the selections
  // without shared keys (topk, cluster without eps or sinks), whose offsets are then all 0.
  index_t pairs = 1;
  for (std::size_t i = 0; i + 2 < Q.shape.size(); ++i) pairs *= Q.shape[i];
  const Selection& sel = r.selection;
  const std::size_t sets = sel.shared_keys.empty() ? static_cast<std::size_t>(pairs) : sel.shared_keys.size();
  std::vector<std::int64_t> keys, offsets{0};
  for (std::size_t i = 0; i < sets; ++i) {
    if (i < sel.shared_keys.size()) keys.insert(keys.end(), sel.shared_keys[i].begin(), sel.shared_keys[i].end());
    offsets.push_back(static_cast<std::int64_t>(keys.size()));
  }
  std::vector<std::pair<std::string, Array>> out;
  out.emplace_back("shared_keys", Array::from_int64({static_cast<index_t>(keys.size())}, keys));
  out.emplace_back("shared_offsets", Array::from_int64({static_cast<index_t>(offsets.size())}, offsets));
  if (o.select == Select::topk || o.select == Select::cluster) {
    std::vector<index_t> shape = Q.shape;  // the queries' leading dimensions, m, top_k
    shape.back() = sel.top_k;
    out.emplace_back("query_keys", Array::from_int64(shape, std::vector<std::int64_t>(sel.query_keys.begin(), sel.query_keys.end())));
  }
  if (sel.residual > 0) {
    std::vector<index_t> shape = Q.shape;  // the queries' leading dimensions, residual blocks, residual
    shape[shape.size() - 2] = sel.residual_blocks(), shape.back() = sel.residual;
    out.emplace_back("residual_keys",
                     Array::from_int64(shape, std::vector<std::int64_t>(sel.residual_keys.begin(), sel.residual_keys.end())));
    shape.pop_back();
    out.emplace_back("residual_weight", Array::from_float64(shape, sel.residual_weight));
    out.emplace_back("residual_block", Array::from_int64({1}, {kResidualBlock}));
  }
  out.emplace_back("window", Array::from_int64({1}, {o.window}));
  out.emplace_back("sinks", Array::from_int64({1}, {o.sinks}));
  out.emplace_back("causal", Array::from_int64({1}, {o.causal ? 1 : 0}));
  out.emplace_back("segment", Array::from_int64({1}, {sel.segment}));
  return out;
}

int run_attend(const AttendArgs& a) {
  const std::vector<Input> in = load_all(a.src, {"q", "k", "v"}, {"queries", "keys", "values"}, 4);
  const Input &Q = in[0], &K = in[1], &V = in[2];
  require_same_stack({&Q, &K, &V}, {"queries", "keys", "values"});
  AttentionOptions o = attention_options(a);
  Progress progress("levattn attend");
  o.progress = [&](double f) { progress(f); };
  const Tensor4Ref q = as_tensor(Q), k = as_tensor(K), v = as_tensor(V);
  std::vector<index_t> shape = Q.shape;
  shape.back() = v.cols;
  std::vector<float> out = allocate_named<float>({q.batch, q.heads, q.rows, v.cols}, "output (" + a.out + ")");
  const AttentionResult r = with_sources({&Q, &K, &V}, {"queries", "keys", "values"},
                                         [&] { return attention(q, k, v, out.data(), o); });
  note_budget("attend", o.top_k, k.rows);
  OutputSet files;
  files.add_npy(a.out, Array::from_float32(shape, std::move(out)));
  if (!a.save_selection.empty()) files.add_npz(a.save_selection, selection_arrays(r, Q, o));
  files.commit();
  if (a.json) {
    json j;
    j["shape"] = shape;
    j["kernel"] = to_string(o.kernel);
    j["select"] = to_string(o.select);
    j["selection"] = selection_spec(o);
    j["causal"] = a.causal;
    j["n"] = k.rows;
    j["top_k"] = r.top_k;
    j["shared_sizes"] = r.shared_sizes;
    j["mean_keys_per_query"] = r.mean_keys_per_query;
    j["empty_rows"] = r.empty_rows;
    if (o.select == Select::cluster) j["short_queries"] = r.short_queries;
    j["seconds"] = {{"selection", r.seconds_selection},
                    {"attention", r.seconds_attention},
                    {"total", r.seconds_selection + r.seconds_attention}};
    std::cout << j.dump() << "\n";
  }
  if (r.empty_rows > 0)
    std::cerr << "levattn attend: " << r.empty_rows << " queries had no selected key or a zero normaliser; their output rows are 0\n";
  if (r.short_queries > 0)
    std::cerr << "levattn attend: cluster: " << r.short_queries << " queries found fewer than top_k = " << r.top_k
              << " keys in the clusters they probed (--probe searches more)\n";
  return 0;
}

}  // namespace

Command add_attend(CLI::App& app) {
  auto a = std::make_shared<AttendArgs>();
  auto* sub = app.add_subcommand("attend", "attention over a selection of keys");
  add_qkv_options(sub, a->src);
  sub->add_option("--out", a->out, "output O .npy (float32)")->required();
  sub->add_option("--save-selection", a->save_selection,
                  "also write S.npz: shared_keys / shared_offsets per (batch, head) (causal leverage: per (batch, "
                  "head, block of `segment` queries)), query_keys (topk, cluster; -1: unused), residual_keys, "
                  "residual_weight and residual_block (+residual: per block of queries), window, sinks, causal, segment");
  add_select_option(sub, a->select);
  a->scale.add(sub);
  sub->add_flag("--causal", a->causal,
                "query i sees keys 0 .. i only (m == n); leverage then takes eps and uses each block's causal "
                "universal set");
  const auto retired = retire_selection_options(sub);
  add_json_flag(sub, a->json, "the selection's sizes and timings");
  return {sub, [a, retired] {
            retired();
            return run_attend(*a);
          }};
}

namespace {

// ---------------------------------------------------------------------------------------------

struct PlantedArgs {
  index_t n = 0, d = 0, relevant = 8;
  std::int64_t seed = 0;
  std::string out_dir;
};

int run_planted(const PlantedArgs& a) {
  PlantedOptions o;
  o.n = a.n;
  o.d = a.d;
  o.relevant = a.relevant;
  o.seed = static_cast<std::uint64_t>(a.seed);
  const PlantedInstance p = planted(o);
  const std::filesystem::path dir(a.out_dir);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw Error(ErrorKind::io, a.out_dir, "cannot create directory: " + ec.message());
  OutputSet files;  // the four files as one instance: all new or all as before
  const auto add = [&](const char* name, const DenseMatrix<float>& m) {
    files.add_npy(dir / name, Array::from_float32({m.rows, m.cols}, m.data));
  };
  add("Q.npy", p.Q);
  add("K.npy", p.K);
  add("V.npy", p.V);
  files.add_npy(dir / "relevant.npy",
                Array::from_int64({static_cast<index_t>(p.relevant.size())},
                                  std::vector<std::int64_t>(p.relevant.begin(), p.relevant.end())));
  files.commit();
  std::cout << "wrote " << (dir / "Q.npy").string() << ", K.npy, V.npy (n = " << a.n << ", d = " << a.d
            << ") and relevant.npy (" << p.relevant.size() << " planted keys)\n";
  return 0;
}

}  // namespace

Command add_info(CLI::App& app) {
  auto as_json = std::make_shared<bool>(false);
  auto* sub = app.add_subcommand("info", "print the version, BLAS, ISA and threads in use");
  add_json_flag(sub, *as_json, "the build");
  return {sub, [as_json] { return run_info(*as_json); }};
}

namespace {

// ---------------------------------------------------------------------------------------------

struct EvaluateArgs {
  Sources src{"", {"", "", ""}};
  std::vector<std::string> selections;
  double heavy_eps = 0.05, p = 4.0;
  std::optional<double> scale;
  bool json = false;
};

int run_evaluate(const EvaluateArgs& a) {
  const std::vector<Input> in = load_all(a.src, {"q", "k", "v"}, {"queries", "keys", "values"}, 4);
  const Input &Q = in[0], &K = in[1], &V = in[2];
  require_same_stack({&Q, &K, &V}, {"queries", "keys", "values"});
  std::vector<AttentionOptions> sel;
  for (const std::string& spec : a.selections) sel.push_back(parse_selection(spec));
  EvaluateOptions eo;
  eo.heavy_eps = a.heavy_eps, eo.p = a.p;
  if (a.scale) eo.scale = *a.scale;
  const std::vector<Evaluation> rows = with_sources({&Q, &K, &V}, {"queries", "keys", "values"},
                                                    [&] { return evaluate(as_tensor(Q), as_tensor(K), as_tensor(V), sel, eo); });
  if (a.json) {
    json j = json::array();
    for (const Evaluation& e : rows)
      j.push_back({{"pair", e.pair}, {"selection", e.selection}, {"scale", e.scale}, {"keys_per_query", e.keys_per_query},
                   {"softmax_mass", e.softmax_mass}, {"kernel_mass", e.kernel_mass},
                   {"kernel_heavy_recall", e.kernel_heavy_recall}, {"kernel_heavy", e.kernel_heavy},
                   {"output_error", e.output_error},
                   {"x2_heavy_recall", e.x2_heavy_recall}, {"x2_heavy", e.x2_heavy},
                   {"power_heavy_recall", e.power_heavy_recall}, {"power_heavy", e.power_heavy},
                   {"scores_tied", e.scores_tied}});
    std::cout << json{{"heavy_eps", a.heavy_eps}, {"p", a.p}, {"rows", j}}.dump() << "\n";
    return 0;
  }
  std::printf("%-5s %-44s %8s %9s %9s %9s %9s\n", "pair", "selection", "keys/q", "softmax", "out.err",
              "x^2 rec.", "|x|^p rec");
  bool tied = false;
  for (const Evaluation& e : rows) {
    std::printf("%-5lld %-44s %8.1f %9.4f %9.4f %9.4f %9.4f%s\n", static_cast<long long>(e.pair), e.selection.c_str(),
                e.keys_per_query, e.softmax_mass, e.output_error, e.x2_heavy_recall, e.power_heavy_recall,
                e.scores_tied ? "  tied" : "");
    tied = tied || e.scores_tied;
  }
  std::printf("softmax: mass captured; out.err: ||O_S - O_full|| / ||O_full||; heavy recall at eps %g (p = %g)\n",
              a.heavy_eps, a.p);
  if (tied)
    std::printf("tied: every leverage score of the pair is equal (n <= d): leverage top-k is an index tie-break there\n");
  return 0;
}

}  // namespace

Command add_evaluate(CLI::App& app) {
  auto a = std::make_shared<EvaluateArgs>();
  auto* sub = app.add_subcommand("evaluate", "how well each selection fits these attention heads");
  add_qkv_options(sub, a->src);
  sub->add_option("--select", a->selections,
                  "a selection, repeatable: NAME[:VALUE][+FIELD:VALUE...], e.g. leverage:32, "
                  "leverage+eps:0.05+window:4, topk:32, random:32, cluster:32+probe:8, window:16, full")
      ->required();
  sub->add_option("--heavy-eps", a->heavy_eps, "entries >= this count as heavy, in (0, 1]");
  sub->add_option("--p", a->p, "exponent of the |x|^p heavy recall, > 0");
  sub->add_option("--scale", a->scale,
                  "logit scale of every selection and of full attention (default: 1/sqrt(d) for softmax; 1 for "
                  "queries that already carry their scale)");
  add_json_flag(sub, a->json, "the rows");
  return {sub, [a] { return run_evaluate(*a); }};
}

Command add_planted(CLI::App& app) {
  auto a = std::make_shared<PlantedArgs>();
  auto* sub = app.add_subcommand("planted", "write a planted instance Q.npy K.npy V.npy relevant.npy");
  sub->add_option("--n", a->n, "keys and queries")->required();
  sub->add_option("--d", a->d, "dimension")->required();
  sub->add_option("--relevant", a->relevant, "planted keys (default 8)");
  add_seed_option(sub, a->seed, "the instance");
  sub->add_option("--out-dir", a->out_dir, "directory to write into")->required();
  return {sub, [a] { return run_planted(*a); }};
}

}  // namespace levattn::cli
