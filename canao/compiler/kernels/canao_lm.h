/* canao compiled decoder (causal language model) C API. One model per artifact; the KV
 * caches live inside the model: one per sequence slot (one slot unless canao_lm_set_slots). */
#ifndef CANAO_LM_H
#define CANAO_LM_H
#include <stdint.h>

typedef struct canao_lm canao_lm;

/* Map the weights file, reserve the KV cache (pages are touched only as positions fill),
 * start `threads` threads. NULL on failure with a one-line reason in err. */
canao_lm *canao_lm_open(const char *weights_path, int threads, char *err, int err_len);

/* Run n tokens at positions pos..pos+n-1 (a prompt: n > 1; a decode step: n = 1), writing
 * their keys and values into the cache; the last token's logits are then at
 * canao_lm_logits(). Returns 0, or -1 with err (positions past the context, bad ids). */
int canao_lm_forward(canao_lm *m, const int32_t *tokens, int n, int pos, char *err, int err_len);

/* The same, writing every position's logits to logits[n][canao_lm_vocab] (perplexity, scoring). */
int canao_lm_forward_all(canao_lm *m, const int32_t *tokens, int n, int pos, float *logits, char *err, int err_len);

/* canao_lm_forward for the sequence in `slot` (see canao_lm_set_slots). */
int canao_lm_forward_slot(canao_lm *m, int slot, const int32_t *tokens, int n, int pos, char *err, int err_len);

/* A decode step of several sequences: token t of sequence slots[t] at position positions[t], each
 * with a cache of its own; the weights are read once for all of them. Writes every token's logits
 * to logits[n][canao_lm_vocab]. */
int canao_lm_forward_batch(canao_lm *m, const int32_t *tokens, const int32_t *slots, const int32_t *positions, int n,
                           float *logits, char *err, int err_len);

/* Caches for `slots` sequences (their pages are touched only as positions fill); forgets every
 * cached position. canao_lm_forward and canao_lm_forward_all use slot 0. 0, or -1 out of memory. */
int canao_lm_set_slots(canao_lm *m, int slots);

const float *canao_lm_logits(canao_lm *m);  /* canao_lm_vocab floats, valid until the next forward */

/* Next token from the current logits: greedy when temperature <= 0, else softmax(logits / T)
 * restricted to the top_k (0: all) and the top_p nucleus, drawn with the xorshift state *rng. */
int canao_lm_sample(canao_lm *m, float temperature, int top_k, float top_p, uint64_t *rng);

int canao_lm_set_threads(canao_lm *m, int threads);
void canao_lm_close(canao_lm *m);

extern const long canao_lm_vocab, canao_lm_max_ctx, canao_lm_dim;
extern const char canao_lm_target[];
#endif
