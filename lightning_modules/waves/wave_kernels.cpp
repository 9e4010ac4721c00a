// Fused CPU kernels of the wave cell: the whole rollout, and its adjoint, in one call each.
//
// Each image of the batch is independent, so one thread runs all T steps of one image while its state
// (C x H x W floats, 32 KB for 2 x 64 x 64) stays in cache. A step does the circular 3x3 coupling, the
// tanh and the symplectic Euler update in one pass over the image:
//
//     z_{t+1} = (1 - dt alpha) z_t + dt tanh(W * y_t) - dt omega y_t,    y_{t+1} = y_t + dt z_{t+1}
//
// The backward recomputes the velocities of one chunk of steps from a stored snapshot, then runs the
// adjoint recurrence over the chunk in reverse, accumulating the gradients of omega, alpha and W as it
// goes. Inputs are float32, contiguous, on the CPU; the Python caller checks this.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// glibc's vectorised tanhf for AVX2 (libmvec), eight lanes at a time.
extern "C" __m256 _ZGVdN8v_tanhf(__m256);

namespace {

// Replace x[0] .. x[n - 1] by their tanh, eight at a time where possible.
void tanh_in_place(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(x + i, _ZGVdN8v_tanhf(_mm256_loadu_ps(x + i)));
  }
  for (; i < n; ++i) {
    x[i] = std::tanh(x[i]);
  }
}

// Channels, height and width of one image's state.
struct Shape {
  int64_t channels, height, width;
  int64_t plane() const { return height * width; }
  int64_t state() const { return channels * height * width; }
  int64_t padded_row() const { return width + 2; }
};

// Copy the three rows around row h of every channel of `in` into `rows`, wrapped circularly in both
// directions: rows[(c * 3 + dy) * (W + 2) + 1 + w] = in[c, (h + dy - 1) mod H, w], with one extra column
// on each side.
void wrapped_rows(const float* in, int64_t h, const Shape& s, float* rows) {
  const int64_t width = s.width;
  for (int64_t c = 0; c < s.channels; ++c) {
    for (int64_t dy = 0; dy < 3; ++dy) {
      const int64_t source_row = (h + dy - 1 + s.height) % s.height;
      const float* src = in + c * s.plane() + source_row * width;
      float* dst = rows + (c * 3 + dy) * s.padded_row();
      dst[0] = src[width - 1];
      std::memcpy(dst + 1, src, width * sizeof(float));
      dst[width + 1] = src[0];
    }
  }
}

// Compute out[co] (+)= sum over ci, dy, dx of k[co, ci, dy, dx] * in[ci, h + dy - 1, w + dx - 1], with
// indices mod H and W. With `accumulate` the sum is added to `out`, otherwise it replaces it.
void circular_stencil(const float* in, const float* k, float* out, const Shape& s, bool accumulate, float* rows) {
  const int64_t width = s.width;
  for (int64_t h = 0; h < s.height; ++h) {
    wrapped_rows(in, h, s, rows);
    for (int64_t co = 0; co < s.channels; ++co) {
      float* o = out + co * s.plane() + h * width;
      if (!accumulate) {
        std::fill(o, o + width, 0.0f);
      }
      for (int64_t ci = 0; ci < s.channels; ++ci) {
        for (int64_t dy = 0; dy < 3; ++dy) {
          const float* r = rows + (ci * 3 + dy) * s.padded_row();
          const float* taps = k + ((co * s.channels + ci) * 3 + dy) * 3;
          const float k0 = taps[0], k1 = taps[1], k2 = taps[2];
#pragma omp simd
          for (int64_t w = 0; w < width; ++w) {
            o[w] += k0 * r[w] + k1 * r[w + 1] + k2 * r[w + 2];
          }
        }
      }
    }
  }
}

// Add to grad_k[co, ci, dy, dx] the sum over h, w of g[co, h, w] * y[ci, h + dy - 1, w + dx - 1] (indices
// mod H and W): the coupling's weight gradient from one step of one image.
void coupling_weight_grad(const float* y, const float* g, double* grad_k, const Shape& s, float* rows) {
  const int64_t width = s.width;
  for (int64_t h = 0; h < s.height; ++h) {
    wrapped_rows(y, h, s, rows);
    for (int64_t co = 0; co < s.channels; ++co) {
      const float* g_row = g + co * s.plane() + h * width;
      for (int64_t ci = 0; ci < s.channels; ++ci) {
        for (int64_t dy = 0; dy < 3; ++dy) {
          for (int64_t dx = 0; dx < 3; ++dx) {
            const float* r = rows + (ci * 3 + dy) * s.padded_row() + dx;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t w = 0; w < width; ++w) {
              sum += g_row[w] * r[w];
            }
            grad_k[((co * s.channels + ci) * 3 + dy) * 3 + dx] += sum;
          }
        }
      }
    }
  }
}

// Return the kernel of the stencil's adjoint with respect to its input: W^T, flipped in space.
std::vector<float> transposed_flipped(const float* k, int64_t channels) {
  std::vector<float> out(channels * channels * 9);
  for (int64_t co = 0; co < channels; ++co) {
    for (int64_t ci = 0; ci < channels; ++ci) {
      for (int64_t dy = 0; dy < 3; ++dy) {
        for (int64_t dx = 0; dx < 3; ++dx) {
          out[((ci * channels + co) * 3 + (2 - dy)) * 3 + (2 - dx)] = k[((co * channels + ci) * 3 + dy) * 3 + dx];
        }
      }
    }
  }
  return out;
}

Shape shape_of(const torch::Tensor& state) {
  return Shape{state.size(1), state.size(2), state.size(3)};
}

}  // namespace

// Return (positions (T, N, C, H, W), velocity snapshots (ceil(T / chunk), N, C, H, W)).
std::vector<torch::Tensor> rollout_forward(
    torch::Tensor y0, torch::Tensor omega, torch::Tensor alpha, torch::Tensor weight, int64_t steps, double dt,
    int64_t chunk) {
  const Shape s = shape_of(y0);
  const int64_t batch = y0.size(0);
  const int64_t n_chunks = (steps + chunk - 1) / chunk;
  auto positions = torch::empty({steps, batch, s.channels, s.height, s.width}, y0.options());
  auto snapshots = torch::empty({n_chunks, batch, s.channels, s.height, s.width}, y0.options());
  const float step = static_cast<float>(dt);
  const float* k = weight.data_ptr<float>();
  float* positions_data = positions.data_ptr<float>();
  float* snapshots_data = snapshots.data_ptr<float>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> velocity(s.state()), force(s.state()), rows(s.channels * 3 * s.padded_row());
    for (int64_t n = begin; n < end; ++n) {
      const float* omega_n = omega.data_ptr<float>() + n * s.state();
      const float* alpha_n = alpha.data_ptr<float>() + n * s.state();
      const float* y = y0.data_ptr<float>() + n * s.state();
      std::fill(velocity.begin(), velocity.end(), 0.0f);
      for (int64_t t = 0; t < steps; ++t) {
        if (t % chunk == 0) {
          std::memcpy(snapshots_data + ((t / chunk) * batch + n) * s.state(), velocity.data(), s.state() * sizeof(float));
        }
        circular_stencil(y, k, force.data(), s, false, rows.data());
        tanh_in_place(force.data(), s.state());
        float* y_next = positions_data + (t * batch + n) * s.state();
        float* z = velocity.data();
        const float* f = force.data();
#pragma omp simd
        for (int64_t i = 0; i < s.state(); ++i) {
          z[i] = (1.0f - step * alpha_n[i]) * z[i] + step * f[i] - step * omega_n[i] * y[i];
          y_next[i] = y[i] + step * z[i];
        }
        y = y_next;
      }
    }
  });
  return {positions, snapshots};
}

// Return (grad y0, grad omega, grad alpha, grad weight) for upstream gradients of all positions.
std::vector<torch::Tensor> rollout_backward(
    torch::Tensor grad_positions, torch::Tensor y0, torch::Tensor omega, torch::Tensor alpha, torch::Tensor weight,
    torch::Tensor positions, torch::Tensor snapshots, double dt, int64_t chunk) {
  const Shape s = shape_of(y0);
  const int64_t batch = y0.size(0);
  const int64_t steps = positions.size(0);
  const int64_t n_chunks = (steps + chunk - 1) / chunk;
  const float step = static_cast<float>(dt);
  const float* k = weight.data_ptr<float>();
  const std::vector<float> k_adjoint = transposed_flipped(k, s.channels);
  const int64_t n_taps = s.channels * s.channels * 9;

  auto grad_y0 = torch::empty_like(y0);
  auto grad_omega = torch::zeros_like(omega);
  auto grad_alpha = torch::zeros_like(alpha);
  std::vector<double> grad_k_per_image(batch * n_taps, 0.0);
  const float* upstream = grad_positions.data_ptr<float>();
  const float* positions_data = positions.data_ptr<float>();
  const float* snapshots_data = snapshots.data_ptr<float>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const int64_t state = s.state();
    std::vector<float> grad_y(state), grad_z(state), grad_pre(state), rows(s.channels * 3 * s.padded_row());
    std::vector<float> velocities(chunk * state), slopes(chunk * state);
    for (int64_t n = begin; n < end; ++n) {
      const float* omega_n = omega.data_ptr<float>() + n * state;
      const float* alpha_n = alpha.data_ptr<float>() + n * state;
      float* grad_omega_n = grad_omega.data_ptr<float>() + n * state;
      float* grad_alpha_n = grad_alpha.data_ptr<float>() + n * state;
      double* grad_k = grad_k_per_image.data() + n * n_taps;
      auto position_at = [&](int64_t t) {  // y_t, with y_0 the initial state
        return t == 0 ? y0.data_ptr<float>() + n * state : positions_data + ((t - 1) * batch + n) * state;
      };
      std::fill(grad_y.begin(), grad_y.end(), 0.0f);
      std::fill(grad_z.begin(), grad_z.end(), 0.0f);

      for (int64_t index = n_chunks - 1; index >= 0; --index) {
        const int64_t start = index * chunk;
        const int64_t length = std::min(chunk, steps - start);

        // Recompute z_t and dt * tanh'(W * y_t) for the chunk's steps from the stored snapshot.
        std::memcpy(velocities.data(), snapshots_data + (index * batch + n) * state, state * sizeof(float));
        for (int64_t offset = 0; offset < length; ++offset) {
          const float* y = position_at(start + offset);
          float* slope = slopes.data() + offset * state;
          circular_stencil(y, k, slope, s, false, rows.data());
          tanh_in_place(slope, state);
          if (offset + 1 < length) {
            const float* z = velocities.data() + offset * state;
            float* z_next = velocities.data() + (offset + 1) * state;
#pragma omp simd
            for (int64_t i = 0; i < state; ++i) {
              z_next[i] = (1.0f - step * alpha_n[i]) * z[i] + step * slope[i] - step * omega_n[i] * y[i];
            }
          }
#pragma omp simd
          for (int64_t i = 0; i < state; ++i) {
            slope[i] = step * (1.0f - slope[i] * slope[i]);
          }
        }

        // Adjoint recurrence, last step of the chunk first.
        for (int64_t offset = length - 1; offset >= 0; --offset) {
          const int64_t t = start + offset;
          const float* y = position_at(t);
          const float* z = velocities.data() + offset * state;
          const float* slope = slopes.data() + offset * state;
          const float* g_pos = upstream + (t * batch + n) * state;
#pragma omp simd
          for (int64_t i = 0; i < state; ++i) {
            grad_y[i] += g_pos[i];
            const float g = grad_z[i] + step * grad_y[i];  // dL/dz_{t+1}
            grad_pre[i] = slope[i] * g;
            grad_omega_n[i] -= step * y[i] * g;
            grad_alpha_n[i] -= step * z[i] * g;
            grad_y[i] -= step * omega_n[i] * g;
            grad_z[i] = (1.0f - step * alpha_n[i]) * g;
          }
          circular_stencil(grad_pre.data(), k_adjoint.data(), grad_y.data(), s, true, rows.data());
          coupling_weight_grad(y, grad_pre.data(), grad_k, s, rows.data());
        }
      }
      std::memcpy(grad_y0.data_ptr<float>() + n * state, grad_y.data(), state * sizeof(float));
    }
  });

  auto grad_weight = torch::zeros_like(weight);
  float* grad_weight_data = grad_weight.data_ptr<float>();
  for (int64_t tap = 0; tap < n_taps; ++tap) {
    double total = 0.0;
    for (int64_t n = 0; n < batch; ++n) {
      total += grad_k_per_image[n * n_taps + tap];
    }
    grad_weight_data[tap] = static_cast<float>(total);
  }
  return {grad_y0, grad_omega, grad_alpha, grad_weight};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rollout_forward", &rollout_forward, "wave cell rollout: positions and velocity snapshots");
  m.def("rollout_backward", &rollout_backward, "adjoint of the wave cell rollout");
}
