/* Host functions for CUDA host nodes (cuLaunchHostFunc): a stream posts a semaphore to hand work
 * to a host thread, and waits on another until that work is done. They call no CUDA, as host
 * nodes must not; the wait retries when a signal interrupts it (a return there would let the
 * stream run on before the host's result is in). */
#include <errno.h>
#include <semaphore.h>
#include <stdint.h>
#include <time.h>

void el_post(void *sem) { sem_post((sem_t *)sem); }

void el_wait(void *sem) {
  while (sem_wait((sem_t *)sem) == -1 && errno == EINTR) {
  }
}

/* For the host thread: wait at most timeout_ms; 1 if posted, 0 on timeout. */
int el_timed_wait(void *sem, int64_t timeout_ms) {
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
