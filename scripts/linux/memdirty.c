/* A small memory-dirtying program for the Linux test guest: touches a working
   set of pages in a loop and prints a progress line now and then, so a
   snapshot or migration of a running Linux guest has real dirty pages. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 32;
    long rounds = argc > 2 ? strtol(argv[2], NULL, 10) : -1;
    size_t len = mib << 20, pages = len / 4096;
    unsigned long *mem = malloc(len);
    if (!mem) { perror("malloc"); return 1; }
    memset(mem, 0, len);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long r = 1; rounds < 0 || r <= rounds; r++) {
        for (size_t p = 0; p < pages; p++) mem[p * 512] = (r << 32) | p;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        if (r % 100 == 1) printf("MEMDIRTY round=%ld pages=%zu rate=%.0f pages/s\n", r, pages, r * (double)pages / s), fflush(stdout);
    }
    for (size_t p = 0; p < pages; p++)
        if ((mem[p * 512] & 0xffffffff) != p) { printf("MEMDIRTY FAIL page=%zu\n", p); return 1; }
    printf("MEMDIRTY OK\n");
    return 0;
}
