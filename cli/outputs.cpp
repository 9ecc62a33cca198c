// Output files shared by levattn and levattn-mpi: universal sets and heavy entries.
#include <sstream>

#include "cli/cli.hpp"

namespace levattn::cli {

json set_json(const UniversalSet& u) {
  json j;
  j["rank"] = u.rank;
  j["size"] = u.indices.size();
  j["bound"] = u.size_bound;
  j["ties_left_out"] = u.ties_left_out;
  j["indices"] = u.indices;
  j["scores"] = u.scores;
  return j;
}

void write_sets(const std::string& out, const std::vector<UniversalSet>& sets, bool stacked) {
  if (!is_npz(out)) {
    if (stacked)
      throw Error(ErrorKind::invalid_argument, "out", "a stack of key matrices gives one set per (batch, head); write an .npz");
    write_npy(out, Array::from_int64({static_cast<index_t>(sets[0].indices.size())},
                                     std::vector<std::int64_t>(sets[0].indices.begin(), sets[0].indices.end())));
    return;
  }
  std::vector<std::int64_t> indices, offsets{0};
  std::vector<double> scores;
  for (const UniversalSet& u : sets) {
    indices.insert(indices.end(), u.indices.begin(), u.indices.end());
    scores.insert(scores.end(), u.scores.begin(), u.scores.end());
    offsets.push_back(static_cast<std::int64_t>(indices.size()));
  }
  const auto c = static_cast<index_t>(indices.size());
  write_npz(out, {{"indices", Array::from_int64({c}, indices)},
                  {"offsets", Array::from_int64({static_cast<index_t>(offsets.size())}, offsets)},
                  {"scores", Array::from_float64({c}, scores)}});
}

// Entries of every (batch, head) pair as CSV text or .npz members, with the leading columns the
// input has: "query,key,value", "head,..." (3-D) or "batch,head,..." (4-D).
void write_heavy(const std::string& out, const std::vector<HeavyEntries>& per, index_t heads, std::size_t dims,
                 bool to_stdout) {
  const bool with_head = dims >= 3, with_batch = dims >= 4;
  if (is_npz(out)) {
    std::vector<std::int64_t> batch, head, query, key;
    std::vector<double> value;
    for (std::size_t h = 0; h < per.size(); ++h)
      for (const HeavyEntry& e : per[h].entries) {
        batch.push_back(static_cast<index_t>(h) / heads);
        head.push_back(static_cast<index_t>(h) % heads);
        query.push_back(e.query);
        key.push_back(e.key);
        value.push_back(e.value);
      }
    const auto c = static_cast<index_t>(query.size());
    std::vector<std::pair<std::string, Array>> arrays;
    if (with_batch) arrays.emplace_back("batch", Array::from_int64({c}, batch));
    if (with_head) arrays.emplace_back("head", Array::from_int64({c}, head));
    arrays.emplace_back("query", Array::from_int64({c}, query));
    arrays.emplace_back("key", Array::from_int64({c}, key));
    arrays.emplace_back("value", Array::from_float64({c}, value));
    write_npz(out, arrays);
    return;
  }
  std::ostringstream csv;
  csv << (with_batch ? "batch," : "") << (with_head ? "head," : "") << "query,key,value\n";
  for (std::size_t h = 0; h < per.size(); ++h)
    for (const HeavyEntry& e : per[h].entries) {
      if (with_batch) csv << static_cast<index_t>(h) / heads << ',';
      if (with_head) csv << static_cast<index_t>(h) % heads << ',';
      csv << e.query << ',' << e.key << ',' << format_value(e.value) << '\n';
    }
  if (to_stdout) std::cout << csv.str();
  else write_text_file(out, csv.str());
}

}  // namespace levattn::cli
