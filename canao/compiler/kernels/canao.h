/* canao compiled-model C API. One model per artifact; thread-safe across models,
 * not across concurrent canao_run calls on the same model (they share its arena). */
#ifndef CANAO_H
#define CANAO_H
#include <stdint.h>

typedef struct canao_model canao_model;

/* Map the packed weights file and allocate the arena. NULL on failure, with a
 * one-line reason in err (wrong CPU, missing or truncated weights). */
canao_model *canao_open(const char *weights_path, int threads, char *err, int err_len);

/* Run a batch of `batch` rows of `seq` tokens (seq <= canao_max_seq). Inputs are
 * int64 [batch, seq]; outputs[i] are float32 [batch, seq]. Returns 0, or -1 with err. */
int canao_run(canao_model *m, int batch, int seq, const int64_t *input_ids, const int64_t *token_type_ids,
              const int64_t *attention_mask, float *const *outputs, char *err, int err_len);

int canao_set_threads(canao_model *m, int threads);
void canao_close(canao_model *m);

extern const long canao_max_seq, canao_arena_bytes, canao_weight_bytes, canao_num_outputs;
extern const long canao_vocab_size, canao_type_vocab_size;  /* ids must lie below these (0: unchecked) */
extern const char canao_target[];
#endif
