/* Host functions for CUDA host nodes (cuLaunchHostFunc): a stream posts a semaphore to hand work
 * to a host thread, and waits on another until that work is done. They call no CUDA, as host
 * nodes must not; the wait retries when a signal interrupts it (a return there would let the
 * stream run on before the host's result is in).
 *
 * Each wait may first poll for a while (el_set_spin): a blocked thread takes tens of
 * microseconds to wake, on a virtual machine more, which a one-token decode step pays per
 * layer, twice. Polling costs a core while it lasts. */
#include <errno.h>
#include <semaphore.h>
#include <stdint.h>
#include <time.h>

static volatile int64_t spin_ready_ns, spin_done_ns;

void el_set_spin(int64_t ready_us, int64_t done_us) {
  spin_ready_ns = ready_us * 1000;
  spin_done_ns = done_us * 1000;
}

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000L + t.tv_nsec;
}

/* 1 if the semaphore was taken within ns nanoseconds of polling. */
static int polled(sem_t *sem, int64_t ns) {
  if (ns <= 0) return 0;
  const int64_t until = now_ns() + ns;
  do {
    if (sem_trywait(sem) == 0) return 1;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  } while (now_ns() < until);
  return 0;
}

void el_post(void *sem) { sem_post((sem_t *)sem); }

/* The stream's wait for the host thread's result (a host node on the driver's thread). */
void el_wait(void *sem) {
  if (polled((sem_t *)sem, spin_done_ns)) return;
  while (sem_wait((sem_t *)sem) == -1 && errno == EINTR) {
  }
}

/* For the host thread: wait at most timeout_ms for the stream's post; 1 if posted, 0 on timeout. */
int el_timed_wait(void *sem, int64_t timeout_ms) {
  if (polled((sem_t *)sem, spin_ready_ns)) return 1;
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += timeout_ms / 1000;
  until.tv_nsec += (timeout_ms % 1000) * 1000000L;
  if (until.tv_nsec >= 1000000000L) {
    until.tv_sec += 1;
    until.tv_nsec -= 1000000000L;
  }
  for (;;) {
    if (sem_timedwait((sem_t *)sem, &until) == 0) return 1;
    if (errno == ETIMEDOUT) return 0;
    if (errno != EINTR) return -1;
  }
}

int el_sem_init(void *sem) { return sem_init((sem_t *)sem, 0, 0); }
int el_sem_destroy(void *sem) { return sem_destroy((sem_t *)sem); }
int64_t el_sem_size(void) { return (int64_t)sizeof(sem_t); }
