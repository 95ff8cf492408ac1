// The runtime half of the shim (see cudashim.h): barriers, fibers or threads, the launcher and
// the kernel registry. Included once, by the library source that tests/test_kernels_host.py
// generates after the kernel sources:
//
//   #include "cudashim.h"
//   #include ".../kernels/hermitian.cu"
//   #include "cudashim_runtime.h"
//   CUDASHIM_KERNELS(CUDASHIM_KERNEL(hermitian_t4_f32) ...)
//
// It exports two C functions for ctypes: cudashim_launch and cudashim_kernel_names.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef CUDASHIM_THREADS
#include <barrier>
#include <memory>
#include <thread>
#else
#include <ucontext.h>
#endif

namespace cudashim {

uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;
static std::vector<unsigned char> g_smem;

void* dynamic_smem() { return g_smem.data(); }

static unsigned threads_per_block() { return g_block_dim.x * g_block_dim.y * g_block_dim.z; }
static unsigned lanes_of_warp(unsigned warp) {
    const unsigned n = threads_per_block();
    return (warp + 1) * 32 <= n ? 32 : n - warp * 32;
}
// One 8-byte slot per thread of the block, for warp shuffles.
static std::vector<std::uint64_t> g_exchange;

#ifdef CUDASHIM_THREADS
// ---------------------------------------------------------------- std::thread mode (TSan)
static thread_local ThreadContext* tl_current = nullptr;
static std::unique_ptr<std::barrier<>> g_block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;

ThreadContext* current() { return tl_current; }
void syncthreads() { g_block_barrier->arrive_and_wait(); }
static void warp_barrier() { g_warp_barriers[current()->linear / 32]->arrive_and_wait(); }

template <typename Body>
static void run_block(Body&& body) {
    const unsigned n = threads_per_block();
    g_block_barrier = std::make_unique<std::barrier<>>(n);
    g_warp_barriers.clear();
    for (unsigned w = 0; w * 32 < n; ++w) {
        g_warp_barriers.push_back(std::make_unique<std::barrier<>>(lanes_of_warp(w)));
    }
    std::vector<ThreadContext> contexts(n);
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned t = 0; t < n; ++t) {
        contexts[t].linear = t;
        contexts[t].thread_idx = {t % g_block_dim.x, (t / g_block_dim.x) % g_block_dim.y,
                                  t / (g_block_dim.x * g_block_dim.y)};
        threads.emplace_back([&, t] {
            tl_current = &contexts[t];
            body();
            // A returned thread no longer takes part in barriers (Volta+ semantics).
            g_warp_barriers[t / 32]->arrive_and_drop();
            g_block_barrier->arrive_and_drop();
        });
    }
    for (auto& th : threads) th.join();
}
#else
// ---------------------------------------------------------------- fiber mode (default)
struct Fiber {
    ThreadContext context;
    ucontext_t uc;
    bool done = false;
};
struct Barrier {
    unsigned arrived = 0;
    unsigned generation = 0;
    unsigned alive = 0;
};
static std::vector<Fiber> g_fibers;
static std::vector<std::vector<char>> g_stacks;
static ucontext_t g_scheduler;
static Fiber* g_running = nullptr;
static Barrier g_block_barrier;
static std::vector<Barrier> g_warp_barriers;
static unsigned long long g_events = 0;  // barrier arrivals, releases and exits
static std::function<void()>* g_body = nullptr;
constexpr std::size_t kStackBytes = 256 * 1024;

ThreadContext* current() { return &g_running->context; }

static void yield_to_scheduler() { swapcontext(&g_running->uc, &g_scheduler); }

static void arrive_and_wait(Barrier& b) {
    ++g_events;
    const unsigned generation = b.generation;
    if (++b.arrived == b.alive) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == generation) yield_to_scheduler();
}

// A returning thread leaves the barrier; if everyone still alive is waiting, release them.
static void drop_out(Barrier& b) {
    --b.alive;
    if (b.arrived > 0 && b.arrived == b.alive) {
        b.arrived = 0;
        ++b.generation;
    }
}

void syncthreads() { arrive_and_wait(g_block_barrier); }
static void warp_barrier() { arrive_and_wait(g_warp_barriers[current()->linear / 32]); }

static void fiber_entry() {
    (*g_body)();
    Fiber* self = g_running;
    self->done = true;
    ++g_events;
    drop_out(g_warp_barriers[self->context.linear / 32]);
    drop_out(g_block_barrier);
    // Returning resumes uc_link, the scheduler.
}

template <typename Body>
static void run_block(Body&& body) {
    std::function<void()> fn(body);
    g_body = &fn;
    const unsigned n = threads_per_block();
    g_fibers.assign(n, Fiber{});
    if (g_stacks.size() < n) g_stacks.resize(n);
    g_block_barrier = Barrier{0, 0, n};
    g_warp_barriers.assign((n + 31) / 32, Barrier{});
    for (unsigned w = 0; w < g_warp_barriers.size(); ++w) g_warp_barriers[w].alive = lanes_of_warp(w);
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = g_fibers[t];
        f.context.linear = t;
        f.context.thread_idx = {t % g_block_dim.x, (t / g_block_dim.x) % g_block_dim.y,
                                t / (g_block_dim.x * g_block_dim.y)};
        g_stacks[t].resize(kStackBytes);
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = g_stacks[t].data();
        f.uc.uc_stack.ss_size = kStackBytes;
        f.uc.uc_link = &g_scheduler;
        makecontext(&f.uc, fiber_entry, 0);
    }
    unsigned remaining = n;
    while (remaining > 0) {
        const unsigned long long before = g_events;
        for (unsigned t = 0; t < n; ++t) {
            Fiber& f = g_fibers[t];
            if (f.done) continue;
            g_running = &f;
            swapcontext(&g_scheduler, &f.uc);
            if (f.done) --remaining;
        }
        if (remaining > 0 && g_events == before) {
            std::fprintf(stderr,
                         "cudashim: deadlock in block (%u,%u,%u): %u threads wait at a barrier "
                         "that the others never reach\n",
                         g_block_idx.x, g_block_idx.y, g_block_idx.z, remaining);
            std::abort();
        }
    }
    g_running = nullptr;
}
#endif

std::uint64_t warp_exchange(std::uint64_t mine, unsigned src_lane) {
    const unsigned t = current()->linear;
    const unsigned warp_base = t / 32 * 32;
    g_exchange[t] = mine;
    warp_barrier();
    const std::uint64_t theirs = g_exchange[warp_base + src_lane];
    warp_barrier();  // nobody overwrites a slot before every lane has read it
    return theirs;
}

using Launcher = void (*)(void** args);
static std::map<std::string, Launcher>& registry() {
    static std::map<std::string, Launcher> kernels;
    return kernels;
}

// Calls kernel(*args[0], *args[1], ...) with each argument read at its declared type, like
// cuLaunchKernel's kernelParams.
template <typename... Args, std::size_t... I>
static void invoke(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(args[I])...);
}
template <typename... Args>
static void invoke(void (*kernel)(Args...), void** args) {
    invoke(kernel, args, std::index_sequence_for<Args...>{});
}

struct Registration {
    Registration(const char* name, Launcher launcher) { registry()[name] = launcher; }
};

}  // namespace cudashim

#define CUDASHIM_KERNEL(name)                                                             \
    static ::cudashim::Registration cudashim_registration_##name(                         \
        #name, [](void** args) { ::cudashim::invoke(&name, args); });

extern "C" int cudashim_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                               unsigned bx, unsigned by, unsigned bz, std::size_t smem_bytes,
                               void** args) {
    using namespace cudashim;
    auto it = registry().find(name);
    if (it == registry().end()) return 1;
    g_grid_dim = dim3(gx, gy, gz);
    g_block_dim = dim3(bx, by, bz);
    if (threads_per_block() == 0 || threads_per_block() > 1024) return 2;
    g_smem.assign(smem_bytes + 16, 0xff);
    g_exchange.assign(threads_per_block(), 0);
    const Launcher launcher = it->second;
    for (unsigned z = 0; z < gz; ++z) {
        for (unsigned y = 0; y < gy; ++y) {
            for (unsigned x = 0; x < gx; ++x) {
                g_block_idx = {x, y, z};
                std::memset(g_smem.data(), 0xff, g_smem.size());
                run_block([&] { launcher(args); });
            }
        }
    }
    return 0;
}

// Names of the registered kernels, separated by spaces (for the Python side's checks).
extern "C" const char* cudashim_kernel_names() {
    static std::string names;
    names.clear();
    for (const auto& entry : cudashim::registry()) names += entry.first + " ";
    return names.c_str();
}
