// The interface the C++ (CPU) and CUDA ops share with fastanalog/ops/cpp.py: the ids of
// response families and algorithms, and the layout of the float[] device description
// (cpp.device_args builds it in this order).
#pragma once

namespace fastanalog {

enum Family : int { kLinear = 0, kPower = 1, kExp = 2, kTable = 3 };
enum Algorithm : int { kAsgd = 0, kRl = 1, kRl2 = 2 };

enum DeviceField : int {
  kFamily = 0,
  kTauMin,
  kTauMax,
  kGamma,
  kDwMin,
  kAsym,
  kD2dStd,
  kC2cStd,
  kHasGamma,
  kZeroShift,
  kShift,
  kDeviceFields
};

}  // namespace fastanalog
