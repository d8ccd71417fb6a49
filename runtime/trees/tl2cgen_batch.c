/* uwrt batch entry point over TL2cgen's generated predict(); compiled with the files TL2cgen
   generates (header.h, main.c, ...). See runtime/trees/tl2cgen.py for the contract. */
#include "header.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if N_TARGET * MAX_N_CLASS != 1
#error "uwrt_predict_batch supports single-output models only"
#endif
#define UWRT_STACK_FEATURES 1024

int32_t uwrt_batch_abi(void) { return 1; }

/* rows: [n_rows, n_features] float32, C order, NaN = missing (never written).
   out: [n_rows] float64 margins. Returns 0, or -1 (feature count mismatch) / -2 (no memory). */
int32_t uwrt_predict_batch(const float* rows, int64_t n_rows, int32_t n_features, double* out) {
  union Entry stack[UWRT_STACK_FEATURES];
  union Entry* buf = stack;
  if (n_features != get_num_feature()) return -1;
  if (n_features > UWRT_STACK_FEATURES) {
    buf = (union Entry*)malloc(sizeof(union Entry) * (size_t)n_features);
    if (!buf) return -2;
  }
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* row = rows + i * (int64_t)n_features;
    float result[1] = {0.0f};
    for (int32_t j = 0; j < n_features; ++j) {
      if (isnan(row[j])) { buf[j].missing = -1; } else { buf[j].fvalue = row[j]; }
    }
    predict(buf, 1, result);
    out[i] = (double)result[0];
  }
  if (buf != stack) free(buf);
  return 0;
}
