// GAE over packed multi-turn trajectories on raw CPU buffers (module atod_fast._gae_cpp).
//
// Trajectory b holds tokens [cu[b], cu[b+1]). Walking its tokens backwards, on an action
// token i (mask[i] != 0):
//     a      = r[i] + γ·next_v − V[i] + γλ·a      (float64)
//     adv[i] = a,  ret[i] = a + V[i],  next_v = V[i]
// and a non-action token leaves a and next_v untouched and gets 0 in both outputs; next_v
// starts at the bootstrap value (or 0) and a at 0. The walk goes run by run (a turn of
// action tokens, then the observation before it): inside an action run next_v is simply
// V[i + 1], so the only serial dependency is one multiply-add per token, and observation
// runs are a vectorizable fill-and-check.
//
// The same pass checks the inputs: a non-finite reward or value, or a nonzero reward on a
// non-action token, sets a flag; the caller then locates the first bad token and raises.
// Trajectories are split into contiguous groups of about equal token counts, one group
// per thread, with the GIL released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

// Below this many tokens per thread, starting a thread costs more than it saves.
constexpr int64_t kMinTokensPerThread = 1 << 16;

struct Args {
  const void* r;
  const void* v;
  const uint8_t* mask;
  const int64_t* cu;
  const double* boot;  // nullptr: terminal episodes
  float* adv;
  float* ret;
  double gamma;
  double gamma_lam;
};

// 1 for NaN and ±inf (all exponent bits set), from the bits, so the checks vectorize.
inline uint32_t nonfinite(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7f800000u) == 0x7f800000u;
}
inline uint32_t nonfinite(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

template <typename TR, typename TV>
bool gae_trajectories(const Args& x, int64_t b0, int64_t b1) {
  const TR* r = static_cast<const TR*>(x.r);
  const TV* v = static_cast<const TV*>(x.v);
  const uint8_t* mask = x.mask;
  float* adv = x.adv;
  float* ret = x.ret;
  const double g = x.gamma, c = x.gamma_lam, c2 = c * c, c3 = c2 * c, c4 = c2 * c2;
  uint32_t bad = 0;
  for (int64_t b = b0; b < b1; ++b) {
    double a = 0.0;
    double next_v = x.boot ? x.boot[b] : 0.0;
    const int64_t lo = x.cu[b];
    for (int64_t i = x.cu[b + 1] - 1, j; i >= lo; i = j - 1) {
      j = i;
      if (mask[i]) {
        while (j > lo && mask[j - 1]) --j;  // action run [j, i] (a turn)
        double vi = static_cast<double>(v[i]);
        a = (static_cast<double>(r[i]) + g * next_v - vi) + c * a;
        adv[i] = static_cast<float>(a);
        ret[i] = static_cast<float>(a + vi);
        // Inside a run the next value is v[k + 1]. Four tokens at a time, each advantage is
        // (a partial sum of the four δ) + c^n·a, so the serial chain through a costs one
        // multiply-add per four tokens instead of one per token.
        int64_t k = i - 1;
        for (; k - 3 >= j; k -= 4) {
          const double v0 = static_cast<double>(v[k]), v1 = static_cast<double>(v[k - 1]);
          const double v2 = static_cast<double>(v[k - 2]), v3 = static_cast<double>(v[k - 3]);
          const double p0 = static_cast<double>(r[k]) + g * vi - v0;
          const double p1 = (static_cast<double>(r[k - 1]) + g * v0 - v1) + c * p0;
          const double p2 = (static_cast<double>(r[k - 2]) + g * v1 - v2) + c * p1;
          const double p3 = (static_cast<double>(r[k - 3]) + g * v2 - v3) + c * p2;
          const double a0 = p0 + c * a, a1 = p1 + c2 * a, a2 = p2 + c3 * a;
          a = p3 + c4 * a;
          adv[k] = static_cast<float>(a0);
          ret[k] = static_cast<float>(a0 + v0);
          adv[k - 1] = static_cast<float>(a1);
          ret[k - 1] = static_cast<float>(a1 + v1);
          adv[k - 2] = static_cast<float>(a2);
          ret[k - 2] = static_cast<float>(a2 + v2);
          adv[k - 3] = static_cast<float>(a);
          ret[k - 3] = static_cast<float>(a + v3);
          vi = v3;
        }
        for (; k >= j; --k) {
          const double vk = static_cast<double>(v[k]);
          a = (static_cast<double>(r[k]) + g * vi - vk) + c * a;
          adv[k] = static_cast<float>(a);
          ret[k] = static_cast<float>(a + vk);
          vi = vk;
        }
        next_v = vi;
        for (int64_t k = j; k <= i; ++k) bad |= nonfinite(r[k]) | nonfinite(v[k]);
      } else {
        while (j > lo && !mask[j - 1]) --j;  // observation run [j, i]: no discount, no value
        for (int64_t k = j; k <= i; ++k) {
          adv[k] = 0.0f;
          ret[k] = 0.0f;
          bad |= static_cast<uint32_t>(r[k] != 0) | nonfinite(v[k]);  // NaN != 0 too
        }
      }
    }
  }
  return bad != 0;
}

using Kernel = bool (*)(const Args&, int64_t, int64_t);

Kernel pick_kernel(bool r64, bool v64) {
  if (r64) return v64 ? gae_trajectories<double, double> : gae_trajectories<double, float>;
  return v64 ? gae_trajectories<float, double> : gae_trajectories<float, float>;
}

// Contiguous trajectory groups [splits[k], splits[k+1]) of about T / n tokens each.
std::vector<int64_t> split_by_tokens(const int64_t* cu, int64_t B, int n) {
  std::vector<int64_t> splits{0};
  const int64_t T = cu[B];
  int64_t b = 0;
  for (int k = 1; k < n; ++k) {
    const int64_t target = T * k / n;
    while (b < B && cu[b + 1] <= target) ++b;
    if (b > splits.back()) splits.push_back(b);
  }
  if (splits.back() != B) splits.push_back(B);
  return splits;
}

void check_array(const py::array& a, const char* name, int64_t n, bool writable) {
  if (a.ndim() != 1 || a.shape(0) != n)
    throw std::invalid_argument(std::string(name) + ": expected a 1-D array of " + std::to_string(n) + " entries");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": expected a contiguous array");
  if (writable && !a.writeable()) throw std::invalid_argument(std::string(name) + ": expected a writable array");
}

bool is_f64(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<double>())) return true;
  if (a.dtype().is(py::dtype::of<float>())) return false;
  throw std::invalid_argument(std::string(name) + ": expected float32 or float64");
}

// Returns false when some token is bad (non-finite, or a reward off the action mask).
bool gae(py::array rewards, py::array values, py::array mask, py::array cu_seqlens, py::object bootstrap,
         py::array adv, py::array ret, double gamma, double lam, int num_threads) {
  const int64_t T = rewards.ndim() == 1 ? rewards.shape(0) : -1;
  check_array(rewards, "rewards", T, false);
  check_array(values, "values", T, false);
  check_array(mask, "action_mask", T, false);
  check_array(adv, "advantages", T, true);
  check_array(ret, "returns", T, true);
  if (cu_seqlens.ndim() != 1 || cu_seqlens.shape(0) < 1) throw std::invalid_argument("cu_seqlens: expected [B+1]");
  const int64_t B = cu_seqlens.shape(0) - 1;
  check_array(cu_seqlens, "cu_seqlens", B + 1, false);
  if (!cu_seqlens.dtype().is(py::dtype::of<int64_t>())) throw std::invalid_argument("cu_seqlens: expected int64");
  if (mask.itemsize() != 1 || mask.dtype().kind() != 'b') throw std::invalid_argument("action_mask: expected bool");
  if (!adv.dtype().is(py::dtype::of<float>()) || !ret.dtype().is(py::dtype::of<float>()))
    throw std::invalid_argument("advantages, returns: expected float32");
  const Kernel kernel = pick_kernel(is_f64(rewards, "rewards"), is_f64(values, "values"));

  Args x{rewards.data(), values.data(), static_cast<const uint8_t*>(mask.data()),
         static_cast<const int64_t*>(cu_seqlens.data()), nullptr, static_cast<float*>(adv.mutable_data()),
         static_cast<float*>(ret.mutable_data()), gamma, gamma * lam};
  py::array boot_arr;
  if (!bootstrap.is_none()) {
    boot_arr = py::array::ensure(bootstrap);
    check_array(boot_arr, "bootstrap_values", B, false);
    if (!boot_arr.dtype().is(py::dtype::of<double>())) throw std::invalid_argument("bootstrap_values: expected float64");
    x.boot = static_cast<const double*>(boot_arr.data());
  }
  if (x.cu[0] != 0 || x.cu[B] != T) throw std::invalid_argument("cu_seqlens: expected 0 = cu[0] and cu[B] = T");
  for (int64_t b = 0; b < B; ++b)
    if (x.cu[b + 1] < x.cu[b]) throw std::invalid_argument("cu_seqlens: expected non-decreasing offsets");

  const int64_t by_size = std::max<int64_t>(1, T / kMinTokensPerThread);
  const int n = static_cast<int>(std::min<int64_t>({std::max(num_threads, 1), std::max<int64_t>(B, 1), by_size}));
  const std::vector<int64_t> splits = split_by_tokens(x.cu, B, n);
  const size_t groups = splits.size() - 1;
  std::vector<char> bad(groups, 0);
  {
    py::gil_scoped_release release;
    std::vector<std::thread> workers;
    for (size_t k = 1; k < groups; ++k)
      workers.emplace_back([&, k] { bad[k] = kernel(x, splits[k], splits[k + 1]); });
    if (groups > 0) bad[0] = kernel(x, splits[0], splits[1]);
    for (auto& w : workers) w.join();
  }
  return std::none_of(bad.begin(), bad.end(), [](char c) { return c != 0; });
}

}  // namespace

PYBIND11_MODULE(_gae_cpp, m) {
  m.doc() = "GAE over packed multi-turn trajectories on raw CPU buffers (see atod_fast.compute_gae).";
  m.def("gae", &gae, py::arg("rewards"), py::arg("values"), py::arg("action_mask"), py::arg("cu_seqlens"),
        py::arg("bootstrap_values"), py::arg("advantages"), py::arg("returns"), py::arg("gamma"), py::arg("lam"),
        py::arg("num_threads"),
        "Write GAE advantages and returns (float32 [T]) in place; False if a token is bad (non-finite, or a "
        "reward off the action mask). Inputs: rewards, values float32/float64 [T], action_mask bool [T], "
        "cu_seqlens int64 [B+1], bootstrap_values float64 [B] or None.");
}
