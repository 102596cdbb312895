// The interface the C++ (CPU) and CUDA kernels share with fastanalog/ops/packing.py (the one
// Python copy, checked against this file by tests/test_layout.py): the ids of response
// families and algorithms, the layout of the float[] device description of one array and
// the layout of the float[] step scalars of the ops fastanalog::{asgd,rl,rl2}_step.
#pragma once

namespace fastanalog {

enum Family : int { kLinear = 0, kPower = 1, kExp = 2, kTable = 3 };
enum Algorithm : int { kAsgd = 0, kRl = 1, kRl2 = 2 };

// One array's device: `devices` holds W's description, then P's (rl, rl2). The table samples
// of a table device (up[0..n], then down[0..n]) follow in `tables`, W's first: kTableSize
// floats each (0 for other families).
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
  kTableSize,
  kDeviceFields
};

// The step's scalars, common to every tensor of a call. kStepFlag is rl's transfer flag of
// this step and rl2's "ema" buffer (0 for asgd); kStepMaxPulses the pulse cap of each
// direction (<= 0: none).
enum StepField : int {
  kStepLr = 0,
  kStepGamma,
  kStepTransferLr,
  kStepReadNoise,
  kStepThreshold,
  kStepMaxPulses,
  kStepFlag,
  kStepFields
};

}  // namespace fastanalog
