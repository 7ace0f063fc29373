// Which implementation runs an op for a given shape on the device: segnet_ext's kernel or
// the vendor library's (cuDNN through ATen). Our kernel runs only where it was measured
// faster: on first use of a shape (the key names shape, dtype, layout and the numeric
// settings) both are timed on the device, the vendor library winning ties (ours must be
// at least kMargin faster), and the result is cached for the process, as
// torch.backends.cudnn.benchmark caches its algorithm choice. Each decision is logged once
// (shown with TORCH_CPP_LOG_LEVEL=INFO) and listed by segnet_ext.kernel_choices().
//
// $SEGNET_EXT_CONV overrides the choice: "auto" (the default: time both), "vendor"
// (always cuDNN; nothing is timed) or "segnet" (always ours where it applies).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/Logging.h>

#include <cstdlib>
#include <functional>
#include <iomanip>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace segnet {

enum class Impl { Vendor, Ours };

inline const char* impl_name(Impl impl) { return impl == Impl::Ours ? "segnet" : "vendor"; }

class KernelChoices {
 public:
  static constexpr double kMargin = 0.05;  // ours must take at most 95% of the vendor's time
  static constexpr const char* kEnv = "SEGNET_EXT_CONV";

  static KernelChoices& instance() {
    static KernelChoices choices;
    return choices;
  }

  // The policy in $SEGNET_EXT_CONV; an unknown value is an error naming the variable.
  static std::string policy() {
    const char* value = std::getenv(kEnv);
    const std::string p = value && *value ? value : "auto";
    TORCH_CHECK_VALUE(p == "auto" || p == "vendor" || p == "segnet", kEnv,
                      " must be auto, vendor or segnet, got \"", p, "\"");
    return p;
  }

  // The implementation for `key`. `time_ms(impl)` runs one implementation on the device and
  // returns its time in milliseconds; it is called only when the policy is "auto" and the
  // key is new.
  Impl choose(const std::string& key, const std::function<double(Impl)>& time_ms) {
    const std::string p = policy();
    if (p == "vendor") return Impl::Vendor;
    if (p == "segnet") return Impl::Ours;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = decisions_.find(key);
      if (found != decisions_.end()) return found->second.impl;
    }
    // Timed outside the lock: a timing launches work on the device and may take a while.
    Decision d;
    d.vendor_ms = time_ms(Impl::Vendor);
    d.ours_ms = time_ms(Impl::Ours);
    d.impl = d.ours_ms <= d.vendor_ms * (1 - kMargin) ? Impl::Ours : Impl::Vendor;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto inserted = decisions_.emplace(key, d);
    if (inserted.second) LOG(INFO) << "segnet_ext: " << describe(key, d);
    return inserted.first->second.impl;
  }

  // One line per decision, in key order: "<key>: vendor 0.41 ms, segnet 3.2 ms -> vendor".
  std::vector<std::string> describe_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> lines;
    for (const auto& [key, d] : decisions_) lines.push_back(describe(key, d));
    return lines;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    decisions_.clear();
  }

 private:
  struct Decision {
    Impl impl = Impl::Vendor;
    double vendor_ms = 0, ours_ms = 0;
  };

  static std::string describe(const std::string& key, const Decision& d) {
    std::ostringstream line;
    line << std::setprecision(3) << key << ": vendor " << d.vendor_ms << " ms, segnet " << d.ours_ms << " ms -> "
         << impl_name(d.impl);
    return line.str();
  }

  std::mutex mutex_;
  std::map<std::string, Decision> decisions_;
};

}  // namespace segnet
